"""A job's life in one place: every change of its status, and what goes with it (its events, its artifact rows, its
files in the store, its webhook).

    queued -> running            claim (a worker took it; again after its lease expired)
    running -> succeeded|failed  finish (the worker that holds the lease)
    queued -> cancelled          cancel (the API; nobody ran it yet)
    running -> cancel_requested  cancel (the API; the worker winds it down) -> cancelled: finish
    cancel_requested -> cancelled  cancel_abandoned (the reconciler; its worker died)
    running -> failed            give_up (a worker; every one of its attempts ended with its worker killed)

The functions write in the caller's transaction (a worker's is the one that proves its lease); what may only happen
once that transaction committed (removing files, sending the webhook) is the caller's next step: announce() an
Ended. The atomic compare-and-sets themselves are SQL statements in prunekit/core/db/queries.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from prunekit.core import layout
from prunekit.core.db import queries
from prunekit.core.db.models import Artifact, Job, utcnow
from prunekit.core.ids import new_id
from prunekit.core.storage import ArtifactStore
from prunekit.vocabulary import OUT_OF_MEMORY, JobStatus

log = logging.getLogger("prunekit.lifecycle")
# The error code of a job given up after its worker was killed on every attempt (give_up).


class Outbox(Protocol):
    """Sends messages to the workers (prunekit/queue.py's QueueOutbox); the core never imports the queue itself."""

    def enqueue_job(self, job_id: str, sent_at: datetime | None = None, countdown: float | None = None) -> None: ...

    def enqueue_webhook(self, job_id: str, status: str) -> None: ...


@dataclass(frozen=True)
class Claimed:
    """A job a worker now holds, with what it needs to run it."""

    job_id: str
    owner: str
    attempt: int
    tenant_id: str
    request: dict[str, Any]


@dataclass(frozen=True)
class Ended:
    """A job that has just ended; announce() it once the transaction that ended it committed."""

    job_id: str
    tenant_id: str
    status: JobStatus
    webhook: bool  # it asked for one


@dataclass(frozen=True)
class StoredFile:
    """One file of a job's result, already in the artifact store."""

    name: str
    key: str
    size_bytes: int
    sha256: str
    content_type: str
    copied: bool = False  # copied within the store from the job's checkpoint, not uploaded


def claim(session: Session, job_id: str, owner: str, lease_s: float, max_running: int,
          max_attempts: int | None = None) -> Claimed | queries.ClaimOutcome:
    """queued (or running with an expired lease, fewer than `max_attempts` times) -> running for `owner`; otherwise
    why not ("exhausted": give_up() it)."""
    outcome = queries.claim_job(session, job_id, owner, lease_s, max_running, max_attempts)
    if outcome != "claimed":
        return outcome
    job = session.get(Job, job_id)
    assert job is not None
    note = " (again, after an interrupted attempt)" if job.attempts > 1 else ""
    queries.add_event(session, job_id, f"Job started on worker {owner}{note}.",
                      data={"status": JobStatus.RUNNING, "worker": owner, "attempt": job.attempts})
    return Claimed(job_id, owner, job.attempts, job.tenant_id, dict(job.request))


def record_progress(session: Session, job_id: str, stage: str, done: int, total: int, message: str = "") -> None:
    fraction = round(done / total, 4) if total else 0.0
    data = {"stage": stage, "done": done, "total": total, "fraction": fraction}
    job = session.get(Job, job_id)
    assert job is not None
    job.progress = data
    queries.add_event(session, job_id, message or f"{stage}: {done}/{total}", type="progress", data=data)


def cancel_requested(session: Session, job_id: str) -> bool:
    """Whether the running job should stop (asked to, or gone)."""
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    return status is None or status == JobStatus.CANCEL_REQUESTED


def publish(session: Session, job_id: str, tenant_id: str, files: list[StoredFile]) -> None:
    """The job's artifacts are these files. A job run again replaces the rows of an earlier attempt: one set of
    artifacts per job."""
    session.execute(delete(Artifact).where(Artifact.job_id == job_id))
    session.add_all([Artifact(id=new_id("art"), job_id=job_id, tenant_id=tenant_id, name=f.name,
                              size_bytes=f.size_bytes, sha256=f.sha256, content_type=f.content_type, storage_key=f.key)
                     for f in files])
    copied = [f for f in files if f.copied]
    how = (f" ({len(copied)} of them, {_mb(sum(f.size_bytes for f in copied))}, copied within the store from the "
           f"job's checkpoint, the rest uploaded)" if copied else "")
    queries.add_event(session, job_id, f"Stored {len(files)} artifacts{how}.",
                      data={"artifacts": sorted(f.name for f in files), "bytes": sum(f.size_bytes for f in files),
                            "copied": sorted(f.name for f in copied),
                            "copied_bytes": sum(f.size_bytes for f in copied)})


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def finish(session: Session, job_id: str, status: JobStatus, message: str, metrics: dict[str, Any] | None = None,
           error: dict[str, str] | None = None) -> Ended:
    """running or cancel_requested -> succeeded, failed or cancelled, by the worker that holds the lease."""
    job = session.get(Job, job_id)
    assert job is not None
    job.status, job.finished_at, job.error = status, utcnow(), error
    job.lease_owner, job.lease_expires_at = None, None
    if status != JobStatus.SUCCEEDED:  # rows an interrupted earlier attempt committed: only a success has artifacts
        session.execute(delete(Artifact).where(Artifact.job_id == job_id))
    if metrics is not None:
        job.metrics = metrics
    if status == JobStatus.SUCCEEDED and job.progress:
        job.progress = {**job.progress, "stage": "done", "fraction": 1.0}
    level = "error" if status == JobStatus.FAILED else "info"
    queries.add_event(session, job_id, message, level=level, type="metrics" if metrics else "message",
                      data={"status": status, **({"metrics": metrics} if metrics else {}),
                            **({"error": error} if error else {})})
    return _ended(job)


def cancel(session: Session, job: Job) -> Ended | None:
    """The client's cancellation: a queued job ends at once (an Ended to announce), a running one is asked to stop
    (None: its worker ends it). Raises queries.StateConflict for a job that has already ended."""
    queries.cancel_job(session, job)
    return _ended(job) if job.status == JobStatus.CANCELLED else None


def cancel_abandoned(session: Session, job_id: str) -> Ended | None:
    """A cancellation whose worker died: nobody is left to wind it down, so the reconciler ends it. None when the
    job was not abandoned (its worker is alive, or another reconciler got there first). The caller removes its
    files once this commits."""
    if not queries.cancel_abandoned(session, job_id):
        return None
    job = session.get(Job, job_id)
    assert job is not None
    return _ended(job)


def give_up(session: Session, job_id: str, max_attempts: int) -> Ended | None:
    """A job whose worker was killed on each of its `max_attempts` attempts ends `failed` (out_of_memory) instead
    of killing one worker after another. None when someone else ended or took it first. The caller removes its
    files once this commits, then announces it.

    Why out_of_memory: an attempt that ends without its worker reporting was ended from outside (the kernel's
    SIGKILL leaves the process no last word, and the service cannot read its supervisor's verdict), and what
    strikes the same job on every attempt, on any worker, is as a rule the kernel's out-of-memory killer; a deploy,
    a lost machine or a database outage interrupts an attempt now and then, not each of them. (A native crash on
    every attempt would read the same: hence "most likely" in the message.)"""
    job = session.get(Job, job_id)
    if job is None:
        return None
    message = _killed_message(job.attempts, job.progress)
    if not queries.give_up_job(session, job_id, max_attempts, {"code": OUT_OF_MEMORY, "message": message}):
        return None
    session.refresh(job)
    queries.add_event(session, job_id, message, level="error",
                      data={"status": JobStatus.FAILED, "error": job.error, "attempts": job.attempts})
    return _ended(job)


def _killed_message(attempts: int, progress: dict[str, Any] | None) -> str:
    where = ""
    if progress and progress.get("stage"):
        where = f" (the last in {progress['stage']}, {progress.get('done')}/{progress.get('total')})"
    return (f"The job's worker was killed without reporting back on each of its {attempts} attempts{where}, most "
            "likely for running out of memory; it is not tried again. Use fewer or shorter calibration samples, "
            "or a worker with more memory.")


def announce(outbox: Outbox, ended: Ended | None) -> None:
    """The one way a job's end is told: its webhook, if it asked for one. Called after the commit that ended it, so
    the webhook never reports what the database does not say; a failed send is only logged."""
    if ended is None or not ended.webhook:
        return
    try:
        outbox.enqueue_webhook(ended.job_id, ended.status)
    except Exception as exc:
        log.warning("could not enqueue the webhook of %s: %s", ended.job_id, exc)


def drop_files(store: ArtifactStore, tenant_id: str, job_id: str) -> None:
    """Everything a job stored (checkpoints, uploads of every attempt): for a job that failed or was cancelled.
    Failing to is only logged: nothing lists the files, so a leftover harms nobody."""
    try:
        store.delete_prefix(layout.job_prefix(tenant_id, job_id))
    except Exception as exc:
        log.warning("could not delete the files of job %s: %s", job_id, exc)


def drop_checkpoints(store: ArtifactStore, tenant_id: str, job_id: str) -> None:
    """A job that ended needs its checkpoints no more; failing to remove them is only logged."""
    try:
        store.delete_prefix(layout.checkpoints_prefix(tenant_id, job_id))
    except Exception as exc:
        log.warning("could not delete the checkpoints of %s: %s", job_id, exc)


def _ended(job: Job) -> Ended:
    return Ended(job.id, job.tenant_id, JobStatus(job.status), bool(job.request.get("webhook")))


# --- a worker process seen dying by its supervisor (`prunekit up`) --------------------------------------------


def owner_prefix(hostname: str, pid: int) -> str:
    """How every lease owner that process `pid` on `hostname` writes begins (workers/lease.py's new_owner): its
    supervisor, which saw the process die, finds the jobs it held by it."""
    return f"{hostname}:{pid}:"


def worker_died(session: Session, prefix: str, how: str, restart_in_s: float) -> list[str]:
    """The jobs held by a worker process that its supervisor saw end (`how`: "killed by SIGKILL"): each gets an
    event saying so, and its lease expires now instead of up to JOB_LEASE_S later, so that the restarted worker's
    reconciler hands it on (it resumes from its last checkpoint) as soon as it starts. A compare-and-set on the
    owner: a job another worker claimed meanwhile is left alone. The caller commits."""
    held = select(Job.id, Job.attempts).where(Job.status.in_(queries.ACTIVE),
                                             Job.lease_owner.startswith(prefix, autoescape=True))
    released = []
    for job_id, attempts in session.execute(held).all():
        result = session.execute(
            update(Job).where(Job.id == job_id, Job.status.in_(queries.ACTIVE),
                              Job.lease_owner.startswith(prefix, autoescape=True))
            .values(lease_expires_at=queries.database_time(-1.0))
            .execution_options(synchronize_session=False))
        if result.rowcount != 1:  # type: ignore[attr-defined]
            continue
        queries.add_event(session, job_id, f"The worker running this job stopped ({how}); it is restarted in "
                          f"{restart_in_s:.0f} s and takes the job up again from its last checkpoint.",
                          level="warning", data={"worker_exit": how, "restart_in_s": restart_in_s,
                                                 "attempt": attempts})
        released.append(job_id)
    return released
