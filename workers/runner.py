"""Runs one job: claim it, run the engine under the lease, publish what it made, end the job. No Celery here."""

from __future__ import annotations

import json
import logging
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from prunekit.core import lifecycle
from prunekit.core.config import Settings
from prunekit.core.db import queries
from prunekit.core.db.session import session_scope
from prunekit.core.logs import current_job_id
from prunekit.core.storage import ArtifactStore, make_store
from prunekit.queue import QueueOutbox
from prunekit.vocabulary import JobStatus
from workers import checkpoints, failures
from workers.inputs import (
    name_datasets_as_submitted,
    name_model_as_submitted,
    note_model_failure,
    resolve_datasets,
    resolve_model,
)
from workers.job_spec import build_spec
from workers.lease import DatabaseUnavailable, Lease, LeaseLost, database_down, new_owner
from workers.pruning.pipeline import run as run_pipeline
from workers.pruning.spec import JobCancelled, JobError, Progress
from workers.publish import publish
from workers.score_cache import StoreScoreCache

log = logging.getLogger("prunekit.worker")
# How soon a job held back by its tenant's cap is offered to the workers again.
CAP_RETRY_S = 5.0


def execute_job(job_id: str, settings: Settings, sent_at: datetime | None = None) -> None:
    token = current_job_id.set(job_id)
    try:
        _execute(job_id, settings, QueueOutbox(settings), sent_at)
    finally:
        current_job_id.reset(token)


def _execute(job_id: str, settings: Settings, outbox: lifecycle.Outbox, sent_at: datetime | None) -> None:
    claimed = _claim(job_id, settings, outbox, sent_at)
    if claimed is None:
        return
    log.info("job started")
    assert settings.work_dir is not None
    # One folder per attempt: a worker on this host that lost the job may still be removing its own.
    shutil.rmtree(settings.work_dir / job_id, ignore_errors=True)
    scratch = settings.work_dir / job_id / f"attempt-{claimed.attempt}"
    scratch.mkdir(parents=True)
    lease = Lease(job_id, claimed.owner, claimed.attempt, settings)
    lease.start()
    try:
        _run(lease, claimed, scratch, outbox)
    except LeaseLost:
        log.warning("job %s: another worker took the job over; this attempt stops without writing", job_id)
    except DatabaseUnavailable as exc:
        log.warning("job %s: %s; this attempt stops without writing, and the job is handed on (resuming from its "
                    "last checkpoint) once the database is back and its lease has run out", job_id, exc)
    finally:
        lease.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def _run(lease: Lease, claimed: lifecycle.Claimed, scratch: Path, outbox: lifecycle.Outbox) -> None:
    job_id, tenant_id, request, settings = lease.job_id, claimed.tenant_id, claimed.request, lease.settings
    store: ArtifactStore | None = None
    try:
        store = make_store(settings)  # the job's one store: every file it reads or writes goes through it
        source = resolve_model(request["model"], settings, scratch / "source", tenant_id=tenant_id, store=store)
        spec = build_spec(request, source, settings)
        spec = resolve_datasets(spec, tenant_id, settings, store, scratch)
        checkpoint = checkpoints.checkpoint_for(lease, store, tenant_id, scratch / "checkpoint")
        result = run_pipeline(spec, scratch / "model", on_progress=lambda p: _record_progress(lease, p),
                              should_cancel=lambda: _cancel_requested(lease), checkpoint=checkpoint,
                              score_cache=StoreScoreCache.for_tenant(store, tenant_id, scratch / "score-cache"))
        name_datasets_as_submitted(result.report, request)
        name_model_as_submitted(result.report, request)
        _record_progress(lease, Progress("uploading", 0, 1, "Uploading the pruned model."))
        report_path = scratch / "report.json"
        report_path.write_text(json.dumps(result.report, indent=2, sort_keys=True))
        files = {p.relative_to(result.output_dir).as_posix(): p for p in sorted(result.output_dir.rglob("*"))
                 if p.is_file()}
        files["report.json"] = report_path
        publish(lease, store, tenant_id, files, checkpoints.stored_output(checkpoint, result.output_dir))
        # Checkpoints are needed no more; removed before the status says so (nobody sees an ended job's files
        # linger), and only while the lease holds: a successor may be resuming from them.
        lease.check()
        lifecycle.drop_checkpoints(store, tenant_id, job_id)
        _end(lease, outbox, JobStatus.SUCCEEDED, _summary(result.metrics), metrics=result.metrics)
    except JobCancelled:
        _end(lease, outbox, JobStatus.CANCELLED, "Job cancelled; partial results were removed.")
        assert store is not None  # only the engine, which runs with the store, cancels
        lifecycle.drop_files(store, tenant_id, job_id)  # only once the lease proved the job is ours to end
    except JobError as exc:
        note_model_failure(request, tenant_id, settings, exc)
        _drop_files(lease, store, tenant_id)
        _end(lease, outbox, JobStatus.FAILED, exc.message, error={"code": exc.code, "message": exc.message})
    except (LeaseLost, DatabaseUnavailable):
        raise
    except Exception as exc:  # the worker must outlive any one job
        if database_down(exc):  # a connection that broke outside the lease's retries: no fault of the job's
            raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc
        log.exception("job %s failed", job_id)
        code, message = failures.describe(exc)  # a full disk or an unreachable store say so; the rest internal_error
        # Its partial files go before its status says so: a full scratch disk is free again for the next job.
        shutil.rmtree(scratch, ignore_errors=True)
        _drop_files(lease, store, tenant_id)
        _end(lease, outbox, JobStatus.FAILED, message, error={"code": code, "message": message})


def _drop_files(lease: Lease, store: ArtifactStore | None, tenant_id: str) -> None:
    """A job that failed keeps nothing in the store: neither its checkpoints nor the files of an upload that failed
    half-way or of an earlier attempt that was interrupted (their rows go when it ends). Removed before its status
    says so, and only while the lease holds."""
    lease.check()
    if store is not None:
        lifecycle.drop_files(store, tenant_id, lease.job_id)


def _end(lease: Lease, outbox: lifecycle.Outbox, status: JobStatus, message: str,
         metrics: dict[str, Any] | None = None, error: dict[str, str] | None = None) -> None:
    ended = lease.write(lambda session: lifecycle.finish(session, lease.job_id, status, message, metrics=metrics,
                                                         error=error), "ending the job")
    lifecycle.announce(outbox, ended)


def _claim(job_id: str, settings: Settings, outbox: lifecycle.Outbox,
           sent_at: datetime | None) -> lifecycle.Claimed | None:
    """Claims the job in the database; a message for a job someone else holds (or that ended) is dropped."""
    with session_scope(settings) as session:
        claimed = lifecycle.claim(session, job_id, new_owner(), settings.job_lease_s,
                                  settings.max_running_jobs_per_tenant, settings.job_max_attempts)
    if isinstance(claimed, lifecycle.Claimed):
        return claimed
    if claimed == "missing":
        log.warning("job %s is not in the database; dropping the message", job_id)
    elif claimed == "capped":
        _wait_for_slot(job_id, settings, outbox, sent_at)
    elif claimed == "exhausted":
        _give_up(job_id, settings, outbox)
    return None


def _give_up(job_id: str, settings: Settings, outbox: lifecycle.Outbox) -> None:
    """Every attempt of the job killed its worker: it ends failed instead of killing this one too."""
    with session_scope(settings) as session:
        ended = lifecycle.give_up(session, job_id, settings.job_max_attempts)
    if ended is None:
        return  # another worker got there first
    log.error("job %s: its worker was killed on each of its %d attempts; failed as out_of_memory", job_id,
              settings.job_max_attempts)
    lifecycle.drop_files(make_store(settings), ended.tenant_id, job_id)  # its checkpoints, and any upload
    lifecycle.announce(outbox, ended)


def _wait_for_slot(job_id: str, settings: Settings, outbox: lifecycle.Outbox, sent_at: datetime | None) -> None:
    """The tenant runs its maximum of jobs: the job stays queued and its message comes back shortly, so no
    worker sleeps on it. Only the newest message of the job comes back (duplicates from the reconciler would
    otherwise circle too); should it be lost, the reconciler re-sends the job."""
    with session_scope(settings) as session:
        now = queries.database_now(session)  # the clock the reconciler compares enqueued_at with
        if sent_at is None:  # a message from before sent_at existed
            queries.note_enqueued(session, job_id, now)
        elif not queries.mark_enqueued(session, job_id, sent_at, now):
            return  # a newer message of this job is on its way
    log.info("job %s waits: its tenant already runs %d jobs", job_id, settings.max_running_jobs_per_tenant)
    try:
        outbox.enqueue_job(job_id, sent_at=now, countdown=CAP_RETRY_S)
    except Exception as exc:
        log.warning("could not re-enqueue %s (the reconciler will): %s", job_id, exc)


def _record_progress(lease: Lease, progress: Progress) -> None:
    # Through a database outage the engine waits here, between blocks, rather than fail the job.
    lease.write(lambda session: lifecycle.record_progress(session, lease.job_id, progress.stage, progress.done,
                                                          progress.total, progress.message), "recording progress")


def _cancel_requested(lease: Lease) -> bool:
    lease.check()  # between blocks is also where a worker that lost its lease stops

    def read() -> bool:
        with session_scope(lease.settings) as session:
            return lifecycle.cancel_requested(session, lease.job_id)

    return lease.patiently(read, "reading whether the job was cancelled")


def _summary(metrics: dict[str, Any]) -> str:
    parts = [f"achieved sparsity {metrics['sparsity']['achieved']:.4f}"]
    if "perplexity" in metrics:
        parts.append(f"perplexity {metrics['perplexity']['dense']:.2f} -> {metrics['perplexity']['pruned']:.2f}")
    if "restore" in metrics:
        restore = metrics["restore"]
        kept = "pruned zeros kept" if restore["mask_preserved"] else "pruned zeros not kept"
        parts.append(f"restored with {restore['method']} in {restore['steps']} steps (loss {restore['loss_first']:.4f} "
                     f"-> {restore['loss_last']:.4f}, {kept})")
    return "Job succeeded: " + ", ".join(parts) + "."
