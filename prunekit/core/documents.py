"""What a client sees of a job, as plain JSON-ready data: the API's JobOut and the webhooks' payload are both built
from job_document, so the two never differ."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Protocol


class JobFields(Protocol):
    """A Job row, or a row of queries.job_view_statement (the same fields, by attribute; a named tuple from
    prunekit/core/db/async_reads.py)."""

    @property
    def id(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def request(self) -> dict[str, Any]: ...
    @property
    def metadata_(self) -> dict[str, Any] | None: ...
    @property
    def progress(self) -> dict[str, Any] | None: ...
    @property
    def metrics(self) -> dict[str, Any] | None: ...
    @property
    def error(self) -> dict[str, Any] | None: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def started_at(self) -> datetime | None: ...
    @property
    def finished_at(self) -> datetime | None: ...


JOB_OBJECT = "pruning.job"


def epoch(ts: datetime | None) -> int | None:
    if ts is None:
        return None
    if ts.tzinfo is None:  # SQLite hands back naive datetimes; they were written as UTC
        ts = ts.replace(tzinfo=UTC)
    return int(ts.timestamp())


def job_document(job: JobFields) -> dict[str, Any]:
    """The job as the API shows it, in JobOut's field order."""
    return {"id": job.id, "object": JOB_OBJECT, "status": str(job.status), "created_at": epoch(job.created_at) or 0,
            "started_at": epoch(job.started_at), "finished_at": epoch(job.finished_at), "request": job.request,
            "progress": job.progress, "metrics": job.metrics, "error": job.error, "metadata": job.metadata_ or {}}
