"""Runs one job: database row in, engine run, artifacts and metrics out. No Celery here."""

from __future__ import annotations

import hashlib
import json
import logging
import mimetypes
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from sqlalchemy import delete

from app.config import Settings
from app.db import queries
from app.db.models import Artifact, Job, utcnow
from app.db.session import session_scope
from app.ids import new_id
from app.logs import current_job_id
from app.queue import enqueue_webhook
from app.storage import S3Store, make_store, parse_s3_url
from workers.pruning.models import resolve_model_ref
from workers.pruning.pipeline import run as run_pipeline
from workers.pruning.spec import (
    CalibrationSpec,
    EvaluationSpec,
    JobCancelled,
    JobError,
    Progress,
    PruneSpec,
)

log = logging.getLogger("prunekit.worker")


def execute_job(job_id: str, settings: Settings) -> None:
    token = current_job_id.set(job_id)
    try:
        _execute(job_id, settings)
    finally:
        current_job_id.reset(token)


def _execute(job_id: str, settings: Settings) -> None:
    if not _start(job_id, settings):
        return
    log.info("job started")
    assert settings.work_dir is not None
    scratch = settings.work_dir / job_id
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        with session_scope(settings) as session:
            job = session.get(Job, job_id)
            assert job is not None
            request, tenant_id = dict(job.request), job.tenant_id
        spec = build_spec(request, resolve_model(request["model"], settings, scratch / "source"), settings)
        result = run_pipeline(spec, scratch / "model", on_progress=lambda p: _record_progress(job_id, p, settings),
                              should_cancel=lambda: _cancel_requested(job_id, settings))
        _record_progress(job_id, Progress("uploading", 0, 1, "Uploading the pruned model."), settings)
        report_path = scratch / "report.json"
        report_path.write_text(json.dumps(result.report, indent=2, sort_keys=True))
        files = {p.relative_to(result.output_dir).as_posix(): p for p in sorted(result.output_dir.rglob("*"))
                 if p.is_file()}
        files["report.json"] = report_path
        _publish(job_id, tenant_id, files, settings)
        _finish(job_id, settings, "succeeded", metrics=result.metrics,
                message=_summary(result.metrics))
    except JobCancelled:
        make_store(settings).delete_prefix(f"{tenant_id}/{job_id}")
        _finish(job_id, settings, "cancelled", message="Job cancelled; partial results were removed.")
    except JobError as exc:
        _finish(job_id, settings, "failed", error={"code": exc.code, "message": exc.message}, message=exc.message)
    except Exception as exc:  # the worker must outlive any one job
        log.exception("job %s failed", job_id)
        message = f"{type(exc).__name__}: {exc}"
        _finish(job_id, settings, "failed", error={"code": "internal_error", "message": message}, message=message)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def build_spec(request: dict[str, Any], model_dir: Path, settings: Settings) -> PruneSpec:
    return PruneSpec(
        model_dir=model_dir,
        method=request["method"],
        sparsity=float(request["sparsity"]),
        pattern=request.get("pattern", "unstructured"),
        calibration=CalibrationSpec(**request.get("calibration", {})),
        evaluation=EvaluationSpec(**request.get("evaluation", {})),
        device=settings.device,
    )


def resolve_model(ref: str, settings: Settings, dest: Path) -> Path:
    """`s3://` folders are fetched by this layer (it owns storage); `local:` and `hf:` by the engine."""
    if not ref.startswith("s3://"):
        assert settings.models_root is not None and settings.hf_cache_dir is not None
        return resolve_model_ref(ref, settings.models_root, settings.hf_cache_dir)
    bucket, prefix = parse_s3_url(ref)
    store = S3Store(bucket=bucket, prefix=prefix, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    try:
        keys = store.list_keys("")
    except Exception as exc:
        raise JobError("model_load_failed", f"Could not list {ref}: {exc}") from exc
    if not keys:
        raise JobError("model_load_failed", f"No files under {ref}.")
    for key in keys:
        store.download_file(key, dest / key)
    return dest


def _start(job_id: str, settings: Settings) -> bool:
    with session_scope(settings) as session:
        job = session.get(Job, job_id, with_for_update=not settings.is_sqlite)
        if job is None:
            log.warning("job %s is not in the database; dropping the message", job_id)
            return False
        if job.status in queries.TERMINAL:
            return False
        if job.status == "cancel_requested":
            job.status, job.finished_at = "cancelled", utcnow()
            queries.add_event(session, job_id, "Job cancelled.", data={"status": "cancelled"})
            return False
        redelivered = job.status == "running"
        job.status, job.started_at, job.attempts = "running", job.started_at or utcnow(), job.attempts + 1
        worker = f"{socket.gethostname()}:{os.getpid()}"
        note = " (delivered again after an interrupted attempt)" if redelivered else ""
        queries.add_event(session, job_id, f"Job started on worker {worker}{note}.",
                          data={"status": "running", "worker": worker, "attempt": job.attempts})
        return True


def _record_progress(job_id: str, progress: Progress, settings: Settings) -> None:
    fraction = round(progress.done / progress.total, 4) if progress.total else 0.0
    data = {"stage": progress.stage, "done": progress.done, "total": progress.total, "fraction": fraction}
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        if job is None:
            return
        job.progress = data
        message = progress.message or f"{progress.stage}: {progress.done}/{progress.total}"
        queries.add_event(session, job_id, message, type="progress", data=data)


def _cancel_requested(job_id: str, settings: Settings) -> bool:
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        return job is None or job.status == "cancel_requested"


def _publish(job_id: str, tenant_id: str, files: dict[str, Path], settings: Settings) -> None:
    store = make_store(settings)
    rows = []
    for name, path in files.items():
        key = f"{tenant_id}/{job_id}/{name}"
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        store.put_file(key, path, content_type)
        rows.append(Artifact(id=new_id("art"), job_id=job_id, tenant_id=tenant_id, name=name,
                             size_bytes=path.stat().st_size, sha256=sha256_file(path), content_type=content_type,
                             storage_key=key))
    with session_scope(settings) as session:
        # A re-delivered job replaces the rows of an earlier attempt: one set of artifacts per job.
        session.execute(delete(Artifact).where(Artifact.job_id == job_id))
        session.add_all(rows)
        queries.add_event(session, job_id, f"Stored {len(rows)} artifacts.",
                          data={"artifacts": sorted(files)})


def _finish(job_id: str, settings: Settings, status: str, message: str, metrics: dict[str, Any] | None = None,
            error: dict[str, str] | None = None) -> None:
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        if job is None:
            return
        job.status, job.finished_at, job.error = status, utcnow(), error
        if metrics is not None:
            job.metrics = metrics
        if status == "succeeded" and job.progress:
            job.progress = {**job.progress, "stage": "done", "fraction": 1.0}
        level = "error" if status == "failed" else "info"
        queries.add_event(session, job_id, message, level=level, type="metrics" if metrics else "message",
                          data={"status": status, **({"metrics": metrics} if metrics else {}),
                                **({"error": error} if error else {})})
        has_webhook = bool(job.request.get("webhook"))
    if has_webhook:
        try:
            enqueue_webhook(settings, job_id, status)
        except Exception as exc:
            log.warning("could not enqueue the webhook of %s: %s", job_id, exc)


def _summary(metrics: dict[str, Any]) -> str:
    parts = [f"achieved sparsity {metrics['sparsity']['achieved']:.4f}"]
    if "perplexity" in metrics:
        parts.append(f"perplexity {metrics['perplexity']['dense']:.2f} -> {metrics['perplexity']['pruned']:.2f}")
    return "Job succeeded: " + ", ".join(parts) + "."


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


