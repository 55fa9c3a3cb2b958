"""The queries each route and the worker need. Every read of tenant data filters by tenant."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Connection, DateTime, Row, Select, and_, bindparam, delete, func, literal, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from prunekit.core.db.models import Artifact, Dataset, Job, JobEvent, Tenant, TenantModel, utcnow
from prunekit.core.ids import new_id
from prunekit.vocabulary import ENDED, JobStatus


class IdempotencyConflict(Exception):
    pass


class StateConflict(Exception):
    pass


def request_digest(request: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def create_job(session: Session, tenant_id: str, request: dict[str, Any], metadata: dict[str, str],
               idempotency_key: str | None) -> tuple[Job, bool]:
    """Returns (job, created). A repeated Idempotency-Key with the same body returns the first job."""
    digest = request_digest(request)
    if idempotency_key is not None:
        existing = _job_by_idempotency_key(session, tenant_id, idempotency_key)
        if existing is not None:
            return _replay(existing, digest), False
    # enqueued_at is set before the send: if the send fails, the reconciler re-sends once it is stale.
    now = utcnow()
    job = Job(id=new_id("job"), tenant_id=tenant_id, status=JobStatus.QUEUED, request=request, metadata_=metadata,
              idempotency_key=idempotency_key, request_hash=digest, attempts=0, created_at=now, enqueued_at=now)
    session.add(job)
    try:
        session.flush()
    except IntegrityError:
        # Two requests with one key raced; the unique index let exactly one through.
        session.rollback()
        existing = _job_by_idempotency_key(session, tenant_id, idempotency_key or "")
        if existing is None:
            raise
        return _replay(existing, digest), False
    add_event(session, job.id, "Job queued.", data={"status": JobStatus.QUEUED})
    return job, True


def _job_by_idempotency_key(session: Session, tenant_id: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def _replay(job: Job, digest: str) -> Job:
    if job.request_hash != digest:
        raise IdempotencyConflict(job.id)
    return job


def get_job(session: Session, tenant_id: str, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))


def job_view_statement() -> Select[Any]:
    """What a client sees of a job (job_out's fields, by attribute as on a Job), read without the ORM: building a
    Job instance (identity map, attribute state) cost more than the query itself on the most polled route.
    Parameters: job_id, tenant_id."""
    return select(Job.id, Job.status, Job.request, Job.metadata_.label("metadata_"), Job.progress, Job.metrics,
                  Job.error, Job.created_at, Job.started_at, Job.finished_at).where(
        Job.id == bindparam("job_id"), Job.tenant_id == bindparam("tenant_id"))


_JOB_VIEW = job_view_statement()


def read_job_view(connection: Connection, tenant_id: str, job_id: str) -> Row[Any] | None:
    """job_view_statement's row; None for a missing job or another tenant's."""
    return connection.execute(_JOB_VIEW, {"job_id": job_id, "tenant_id": tenant_id}).first()


def list_jobs(session: Session, tenant_id: str, limit: int, after: str | None,
              status: str | None) -> tuple[list[Job], bool]:
    query = select(Job).where(Job.tenant_id == tenant_id)
    if status:
        query = query.where(Job.status == status)
    if after:
        query = query.where(Job.id < after)  # ids sort by creation time; the list runs newest first
    rows = list(session.scalars(query.order_by(Job.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def cancel_job(session: Session, job: Job) -> Job:
    """Compare-and-set on the status: a worker claiming the job at the same moment either wins (and the
    job winds down as cancel_requested) or finds it cancelled; an ended job is never reopened."""
    for status, new_status in ((JobStatus.QUEUED, JobStatus.CANCELLED),
                               (JobStatus.RUNNING, JobStatus.CANCEL_REQUESTED)):
        values: dict[str, Any] = {"status": new_status}
        if new_status == JobStatus.CANCELLED:
            values["finished_at"] = utcnow()
        changed = session.execute(update(Job).where(Job.id == job.id, Job.status == status).values(**values)
                                  .execution_options(synchronize_session=False)).rowcount
        if changed:
            session.refresh(job)
            message = ("Job cancelled before it started." if new_status == JobStatus.CANCELLED
                       else "Cancellation requested; the job stops after the current block.")
            add_event(session, job.id, message, data={"status": new_status})
            return job
    session.refresh(job)
    if job.status in ENDED:
        raise StateConflict(f"job {job.id} has already ended ({job.status})")
    return job  # already cancel_requested: asking again changes nothing


def add_event(session: Session, job_id: str, message: str, level: str = "info", type: str = "message",
              data: dict[str, Any] | None = None) -> JobEvent:
    event = JobEvent(job_id=job_id, message=message, level=level, type=type, data=data)
    session.add(event)
    session.flush()
    return event


def list_events(session: Session, job_id: str, after: int | None, limit: int) -> tuple[list[JobEvent], bool]:
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        query = query.where(JobEvent.id > after)
    rows = list(session.scalars(query.order_by(JobEvent.id).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def list_artifacts(session: Session, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def get_artifact(session: Session, tenant_id: str, artifact_id: str) -> Artifact | None:
    return session.scalar(select(Artifact).where(Artifact.id == artifact_id, Artifact.tenant_id == tenant_id))


def add_dataset(session: Session, dataset: Dataset) -> Dataset:
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset | None:
    return session.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id))


def list_datasets(session: Session, tenant_id: str, limit: int, after: str | None) -> tuple[list[Dataset], bool]:
    query = select(Dataset).where(Dataset.tenant_id == tenant_id)
    if after:
        query = query.where(Dataset.id < after)
    rows = list(session.scalars(query.order_by(Dataset.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def active_jobs_using_dataset(session: Session, tenant_id: str, dataset_id: str) -> list[str]:
    """Jobs that have not ended and calibrate (or restore) on the dataset, or score it as a task:
    deleting it would make them fail."""
    jobs = session.scalars(select(Job).where(Job.tenant_id == tenant_id, Job.status.not_in(ENDED)))
    return [job.id for job in jobs if dataset_id in ((job.request.get("calibration") or {}).get("dataset"),
                                                     (job.request.get("restore") or {}).get("dataset"),
                                                     *((job.request.get("evaluation") or {}).get("tasks") or ()))]


# --- Tenant models (POST /v1/models) -----------------------------------------------------------------------


def add_model(session: Session, model: TenantModel) -> TenantModel:
    session.add(model)
    session.flush()
    return model


def get_model(session: Session, tenant_id: str, model_id: str) -> TenantModel | None:
    return session.scalar(select(TenantModel).where(TenantModel.id == model_id, TenantModel.tenant_id == tenant_id))


def list_models(session: Session, tenant_id: str, limit: int, after: str | None) -> tuple[list[TenantModel], bool]:
    query = select(TenantModel).where(TenantModel.tenant_id == tenant_id)
    if after:
        query = query.where(TenantModel.id < after)
    rows = list(session.scalars(query.order_by(TenantModel.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def active_jobs_using_model(session: Session, tenant_id: str, model_id: str) -> list[str]:
    """Jobs that have not ended and prune the model: deleting it would make them fail."""
    jobs = session.execute(select(Job.id, Job.request).where(Job.tenant_id == tenant_id, Job.status.not_in(ENDED)))
    return [job_id for job_id, request in jobs if request.get("model") == model_id]


def mark_model_failed(session: Session, tenant_id: str, model_id: str, error: dict[str, str]) -> None:
    """The worker could not load the model: later jobs are refused at submission, and GET /v1/models says why."""
    session.execute(update(TenantModel).where(TenantModel.id == model_id, TenantModel.tenant_id == tenant_id)
                    .values(status="failed", error=error).execution_options(synchronize_session=False))


# --- Leases: the database decides which worker runs a job -------------------------------------------------

ACTIVE = (JobStatus.RUNNING, JobStatus.CANCEL_REQUESTED)  # a worker holds (or held) the job's lease
# exhausted: the job's last attempt ended without its worker reporting, and it has had its attempts (give_up_job).
ClaimOutcome = Literal["claimed", "capped", "skipped", "missing", "exhausted"]


class database_time(FunctionElement[datetime]):
    """The database server's clock, read by the statement itself, plus `seconds`: every lease is written and
    compared on this one clock, so workers whose own clocks disagree (by minutes, even) still agree on whose lease
    is live. One value per statement (Postgres' statement_timestamp(); SQLite's 'now' holds for one step)."""

    type = DateTime(timezone=True)
    inherit_cache = True
    name = "database_time"

    def __init__(self, seconds: float = 0.0) -> None:
        super().__init__(literal(float(seconds)))


@compiles(database_time)
def _database_time(element: database_time, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    return f"(statement_timestamp() + {seconds} * interval '1 second')"


@compiles(database_time, "sqlite")
def _database_time_sqlite(element: database_time, compiler: SQLCompiler, **kw: Any) -> str:
    # SQLite keeps DateTime columns as text, 'YYYY-MM-DD HH:MM:SS.ffffff' in UTC: the same text (microseconds
    # padded from SQLite's milliseconds), so that comparisons with the columns stay comparisons of times.
    seconds = compiler.process(element.clauses, **kw)
    return f"strftime('%Y-%m-%d %H:%M:%f000', 'now', printf('%+.6f seconds', {seconds}))"


def database_now(session: Session) -> datetime:
    """The database's clock, for a caller that reasons about times the database wrote (leases, enqueued_at)."""
    return aware(session.execute(select(database_time())).scalar_one())


def claim_job(session: Session, job_id: str, owner: str, lease_s: float, max_running: int,
              max_attempts: int | None = None) -> ClaimOutcome:
    """Takes the job for `owner`: queued, or running with an expired lease (its worker died) -> running.

    One conditional UPDATE, so two workers racing for a job cannot both win. The tenant's cap is part of the
    same statement; on Postgres the tenant row is locked first, because under READ COMMITTED two claims for
    different jobs of one tenant would otherwise both count the other's claim as not yet there. SQLite runs
    one writer at a time, which gives the same guarantee. The lease is written and compared on the database's
    clock (database_time), never the worker's. A job whose lease expired after `max_attempts` attempts is not
    taken again ("exhausted"). The caller commits.
    """
    now = database_time()
    tenant_id = session.scalar(select(Job.tenant_id).where(Job.id == job_id))
    if tenant_id is None:
        return "missing"
    if session.get_bind().dialect.name == "postgresql":
        # FOR NO KEY UPDATE: serialises claims of one tenant without blocking inserts of its jobs (FK checks).
        session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True))
    expired = or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now)
    other = select(Job.id).where(Job.tenant_id == tenant_id, Job.id != job_id, Job.status.in_(ACTIVE),
                                 Job.lease_expires_at >= now).subquery()
    running_others = select(func.count()).select_from(other).scalar_subquery()
    retry = and_(Job.status == JobStatus.RUNNING, expired)  # its worker died (or lost the lease)
    if max_attempts is not None:
        retry = and_(retry, Job.attempts < max_attempts)
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, or_(Job.status == JobStatus.QUEUED, retry), running_others < max_running)
        .values(status=JobStatus.RUNNING, lease_owner=owner, lease_expires_at=database_time(lease_s),
                heartbeat_at=now, started_at=func.coalesce(Job.started_at, now), attempts=Job.attempts + 1)
        .execution_options(synchronize_session=False))
    if result.rowcount == 1:  # type: ignore[attr-defined]
        return "claimed"
    row = session.execute(select(Job.status, expired.label("expired"), Job.attempts).where(Job.id == job_id)).one()
    abandoned = row.status == JobStatus.RUNNING and bool(row.expired)
    if abandoned and max_attempts is not None and row.attempts >= max_attempts:
        return "exhausted"
    return "capped" if row.status == JobStatus.QUEUED or abandoned else "skipped"


def touch_lease(session: Session, job_id: str, owner: str, lease_s: float) -> bool:
    """Renews the lease if `owner` still holds it. The row stays locked until the caller's commit, so the
    writes that follow in the same transaction cannot interleave with another worker's claim. A lease that ran out
    while nobody else claimed the job (the database was down, say) is still the owner's to renew."""
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.status.in_(ACTIVE))
        .values(lease_expires_at=database_time(lease_s), heartbeat_at=database_time())
        .execution_options(synchronize_session=False))
    return result.rowcount == 1  # type: ignore[attr-defined]


def cancel_abandoned(session: Session, job_id: str) -> bool:
    """A cancellation requested of a worker that then died: nobody is left to wind it down, so end it here."""
    now = database_time()
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.CANCEL_REQUESTED,
                          or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now))
        .values(status=JobStatus.CANCELLED, finished_at=now, lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    # A cancelled job has no artifacts: rows of an upload its worker committed before dying go too (the caller
    # removes the files once this commits).
    session.execute(delete(Artifact).where(Artifact.job_id == job_id))
    add_event(session, job_id, "Job cancelled (its worker stopped before winding it down).",
              data={"status": JobStatus.CANCELLED})
    return True


def give_up_job(session: Session, job_id: str, max_attempts: int, error: dict[str, str]) -> bool:
    """running, its lease expired after `max_attempts` attempts -> failed with `error`: every attempt ended without
    its worker reporting, so another would most likely end the same way. A compare-and-set: of the workers and
    reconcilers that may see the job at once, one ends it. The caller adds the event and commits."""
    now = database_time()
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.attempts >= max_attempts,
                          or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now))
        .values(status=JobStatus.FAILED, finished_at=now, error=error, lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    session.execute(delete(Artifact).where(Artifact.job_id == job_id))  # a failed job has no artifacts
    return True


@dataclass(frozen=True)
class Unsent:
    """A job that may have no message in the broker, and when one was last sent."""

    id: str
    status: str
    since: datetime  # when it became runnable: created (queued) or its lease expired (running)
    enqueued_at: datetime | None


def jobs_to_resend(session: Session, queued_before: datetime) -> list[Unsent]:
    """Queued jobs last sent before `queued_before`, and running or cancelling jobs whose lease expired (on the
    database's clock)."""
    queued = select(Job.id, Job.status, Job.created_at, Job.enqueued_at).where(
        Job.status == JobStatus.QUEUED, or_(Job.enqueued_at.is_(None), Job.enqueued_at < queued_before))
    expired = select(Job.id, Job.status, func.coalesce(Job.lease_expires_at, Job.created_at), Job.enqueued_at).where(
        Job.status.in_(ACTIVE), or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < database_time()))
    rows = [*session.execute(queued.order_by(Job.id)), *session.execute(expired.order_by(Job.id))]
    return [Unsent(r[0], r[1], aware(r[2]), aware(r[3]) if r[3] else None) for r in rows]


def mark_enqueued(session: Session, job_id: str, previous: datetime | None, now: datetime | None) -> bool:
    """Compare-and-set of enqueued_at: of several reconcilers looking at one job, exactly one re-sends it."""
    same = Job.enqueued_at.is_(None) if previous is None else Job.enqueued_at == previous
    result = session.execute(update(Job).where(Job.id == job_id, same).values(enqueued_at=now)
                             .execution_options(synchronize_session=False))
    return result.rowcount == 1  # type: ignore[attr-defined]


def note_enqueued(session: Session, job_id: str, now: datetime) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=now)
                    .execution_options(synchronize_session=False))


def aware(value: datetime) -> datetime:
    """SQLite hands timestamps back without a zone; every one is stored in UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
