"""The queries each route and the worker need. Every read of tenant data filters by tenant."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import Artifact, Job, JobEvent, Tenant, utcnow
from app.ids import new_id

TERMINAL = ("succeeded", "failed", "cancelled")


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
    job = Job(id=new_id("job"), tenant_id=tenant_id, status="queued", request=request, metadata_=metadata,
              idempotency_key=idempotency_key, request_hash=digest, attempts=0)
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
    add_event(session, job.id, "Job queued.", data={"status": "queued"})
    return job, True


def _job_by_idempotency_key(session: Session, tenant_id: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def _replay(job: Job, digest: str) -> Job:
    if job.request_hash != digest:
        raise IdempotencyConflict(job.id)
    return job


def get_job(session: Session, tenant_id: str, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))


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
    if job.status == "queued":
        job.status, job.finished_at = "cancelled", utcnow()
        add_event(session, job.id, "Job cancelled before it started.", data={"status": "cancelled"})
    elif job.status == "running":
        job.status = "cancel_requested"
        add_event(session, job.id, "Cancellation requested; the job stops after the current block.",
                  data={"status": "cancel_requested"})
    elif job.status in TERMINAL:
        raise StateConflict(f"job {job.id} has already ended ({job.status})")
    session.flush()
    return job


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


def webhook_secret(session: Session, tenant_id: str, rotate: bool = False) -> str:
    """The tenant's signing secret, made on first use; rotating invalidates the old one at once."""
    from app.webhooks import new_secret

    tenant = session.get(Tenant, tenant_id)
    assert tenant is not None
    if tenant.webhook_secret is None or rotate:
        tenant.webhook_secret = new_secret()
        session.flush()
    return tenant.webhook_secret
