"""Pydantic models of the HTTP contract (../shared/api.md)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationInfo, field_validator

from app import capabilities as caps
from app.db.models import Job, JobEvent

_LOCAL = re.compile(r"^local:[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HF = re.compile(r"^hf:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}(@[A-Za-z0-9._/-]{1,128})?$")
_S3 = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9!_.*'()/-]*)?$")


def check_model_ref(ref: str) -> str:
    ok = (_LOCAL.match(ref) and ".." not in ref) or _HF.match(ref) or (_S3.match(ref) and ".." not in ref)
    if not ok:
        raise ValueError(
            "must be local:<name> (a model under the server's models root), hf:<org>/<name>[@revision] "
            "or s3://bucket/prefix"
        )
    return ref


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Calibration(Strict):
    dataset: str = "builtin:wiki-en"
    num_samples: int = Field(64, ge=1, le=caps.LIMITS["calibration_num_samples"])
    seq_len: int = Field(512, ge=16, le=caps.LIMITS["calibration_seq_len"])
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value not in caps.BUILTIN_DATASETS:
            raise ValueError(f"unknown dataset {value!r}; available: {', '.join(caps.BUILTIN_DATASETS)}")
        return value


class Evaluation(Strict):
    perplexity: bool = True
    num_samples: int = Field(64, ge=1, le=caps.LIMITS["evaluation_num_samples"])
    seq_len: int = Field(512, ge=16, le=caps.LIMITS["evaluation_seq_len"])


class Webhook(Strict):
    url: HttpUrl = Field(description="http(s) URL that receives pruning.job.succeeded|failed|cancelled")

    @field_validator("url")
    @classmethod
    def _bounded(cls, value: HttpUrl) -> HttpUrl:
        if len(str(value)) > 2000:
            raise ValueError("at most 2000 characters")
        return value


class JobCreate(Strict):
    model: str = Field(description="local:<name> | hf:<org>/<name>[@revision] | s3://bucket/prefix")
    method: Literal["magnitude", "wanda", "sparsegpt"]
    sparsity: float = Field(gt=0, lt=1)
    pattern: Literal["unstructured", "2:4", "4:8"] = "unstructured"
    allocation: Literal["uniform", "ecoflap-zeroth", "ecoflap-first", "owl"] = "uniform"
    allocation_options: dict[str, Any] = Field(default_factory=dict)
    targets: dict[str, float] | None = None
    restore: dict[str, Any] | None = None
    sweep: dict[str, Any] | None = None
    calibration: Calibration = Field(default_factory=Calibration)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    metadata: dict[str, str] = Field(default_factory=dict)
    webhook: Webhook | None = None

    @field_validator("model")
    @classmethod
    def _model_ref(cls, value: str) -> str:
        return check_model_ref(value)

    @field_validator("method", "pattern", "allocation")
    @classmethod
    def _available(cls, value: str, info: ValidationInfo) -> str:
        allowed = {"method": caps.METHODS, "pattern": caps.PATTERNS, "allocation": caps.ALLOCATIONS}[info.field_name]
        if value not in allowed:
            raise ValueError(f"{info.field_name} {value!r} is not available on this server; "
                             f"available: {', '.join(allowed)}")
        return value

    @field_validator("allocation_options", "targets", "restore", "sweep")
    @classmethod
    def _not_yet(cls, value: Any) -> Any:
        if value:
            raise ValueError("is not available on this server yet; see GET /v1/capabilities")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_bounds(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > caps.LIMITS["metadata_keys"]:
            raise ValueError(f"at most {caps.LIMITS['metadata_keys']} keys")
        if any(len(k) > 64 or len(v) > caps.LIMITS["metadata_value_chars"] for k, v in value.items()):
            raise ValueError(f"keys up to 64 characters, values up to {caps.LIMITS['metadata_value_chars']}")
        return value


def epoch(ts: datetime | None) -> int | None:
    if ts is None:
        return None
    if ts.tzinfo is None:  # SQLite hands back naive datetimes; they were written as UTC
        ts = ts.replace(tzinfo=UTC)
    return int(ts.timestamp())


class JobOut(BaseModel):
    id: str
    object: Literal["pruning.job"] = "pruning.job"
    status: Literal["queued", "running", "cancel_requested", "succeeded", "failed", "cancelled"]
    created_at: int
    started_at: int | None
    finished_at: int | None
    request: dict[str, Any]
    progress: dict[str, Any] | None
    metrics: dict[str, Any] | None
    error: dict[str, Any] | None
    metadata: dict[str, str]


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]
    has_more: bool


class EventOut(BaseModel):
    id: int
    created_at: int
    level: Literal["info", "warning", "error"]
    type: Literal["message", "progress", "metrics"]
    message: str
    data: dict[str, Any] | None


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventOut]
    has_more: bool


class ArtifactOut(BaseModel):
    id: str
    object: Literal["artifact"] = "artifact"
    name: str
    size_bytes: int
    sha256: str
    content_type: str
    created_at: int


class ArtifactList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ArtifactOut]
    has_more: bool = False


def job_out(job: Job) -> JobOut:
    return JobOut(
        id=job.id, status=job.status, created_at=epoch(job.created_at) or 0, started_at=epoch(job.started_at),
        finished_at=epoch(job.finished_at), request=job.request, progress=job.progress, metrics=job.metrics,
        error=job.error, metadata=job.metadata_ or {},
    )


def event_out(event: JobEvent) -> EventOut:
    return EventOut(id=event.id, created_at=epoch(event.created_at) or 0, level=event.level, type=event.type,
                    message=event.message, data=event.data)


class ProblemOut(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    code: str
    param: str | None = None
