"""Runs one job: database row in, engine run, artifacts and metrics out. No Celery here."""

from __future__ import annotations

import hashlib
import json
import logging
import mimetypes
import shutil
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete

from prunekit.core.config import Settings
from prunekit.core.db import queries
from prunekit.core.db.models import Artifact, Job, utcnow
from prunekit.core.db.session import session_scope
from prunekit.core.ids import new_id
from prunekit.core.logs import current_job_id
from prunekit.core.storage import S3Store, make_store, parse_s3_url
from prunekit.queue import enqueue_job, enqueue_webhook
from workers import checkpoints
from workers.lease import Lease, LeaseLost, new_owner
from workers.pruning.models import resolve_model_ref
from workers.pruning.pipeline import run as run_pipeline
from workers.pruning.spec import (
    AllocationSpec,
    CalibrationSpec,
    EvaluationSpec,
    JobCancelled,
    JobError,
    Progress,
    PruneSpec,
    RestoreSpec,
)
from workers.score_cache import StoreScoreCache
from workers.score_cache import prefix_of as score_cache_prefix

log = logging.getLogger("prunekit.worker")
# How soon a job held back by its tenant's cap is offered to the workers again.
CAP_RETRY_S = 5.0


def execute_job(job_id: str, settings: Settings, sent_at: datetime | None = None) -> None:
    token = current_job_id.set(job_id)
    try:
        _execute(job_id, settings, sent_at)
    finally:
        current_job_id.reset(token)


def _execute(job_id: str, settings: Settings, sent_at: datetime | None) -> None:
    lease = _start(job_id, settings, sent_at)
    if lease is None:
        return
    log.info("job started")
    assert settings.work_dir is not None
    # One folder per attempt: a worker on this host that lost the job may still be removing its own.
    shutil.rmtree(settings.work_dir / job_id, ignore_errors=True)
    scratch = settings.work_dir / job_id / f"attempt-{lease.attempt}"
    scratch.mkdir(parents=True)
    lease.start()
    try:
        _run(lease, scratch, settings)
    except LeaseLost:
        log.warning("job %s: another worker took the job over; this attempt stops without writing", job_id)
    finally:
        lease.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def _run(lease: Lease, scratch: Path, settings: Settings) -> None:
    job_id = lease.job_id
    tenant_id: str | None = None
    try:
        with session_scope(settings) as session:
            job = session.get(Job, job_id)
            assert job is not None
            request, tenant_id = dict(job.request), job.tenant_id
        spec = build_spec(request, resolve_model(request["model"], settings, scratch / "source"), settings)
        spec = replace(spec, calibration=replace(
            spec.calibration, dataset=resolve_dataset(spec.calibration.dataset, tenant_id, settings, scratch)))
        if spec.restore is not None and spec.restore.dataset is not None:
            spec = replace(spec, restore=replace(
                spec.restore, dataset=resolve_dataset(spec.restore.dataset, tenant_id, settings, scratch)))
        result = run_pipeline(spec, scratch / "model", on_progress=lambda p: _record_progress(lease, p),
                              should_cancel=lambda: _cancel_requested(lease),
                              checkpoint=checkpoints.checkpoint_for(lease, tenant_id, scratch / "checkpoint"),
                              score_cache=StoreScoreCache(make_store(settings), score_cache_prefix(tenant_id),
                                                          scratch / "score-cache"))
        _name_dataset_as_submitted(result.report, request)
        _name_restore_dataset_as_submitted(result.report, request)
        _record_progress(lease, Progress("uploading", 0, 1, "Uploading the pruned model."))
        report_path = scratch / "report.json"
        report_path.write_text(json.dumps(result.report, indent=2, sort_keys=True))
        files = {p.relative_to(result.output_dir).as_posix(): p for p in sorted(result.output_dir.rglob("*"))
                 if p.is_file()}
        files["report.json"] = report_path
        _publish(lease, tenant_id, files)
        _drop_checkpoints(lease, tenant_id)
        _finish(lease, "succeeded", metrics=result.metrics, message=_summary(result.metrics))
    except JobCancelled:
        _finish(lease, "cancelled", message="Job cancelled; partial results were removed.")
        make_store(settings).delete_prefix(f"{tenant_id}/{job_id}")  # only once the lease proved it is ours
    except JobError as exc:
        _drop_files(lease, tenant_id)
        _finish(lease, "failed", error={"code": exc.code, "message": exc.message}, message=exc.message)
    except LeaseLost:
        raise
    except Exception as exc:  # the worker must outlive any one job
        log.exception("job %s failed", job_id)
        message = f"{type(exc).__name__}: {exc}"
        _drop_files(lease, tenant_id)
        _finish(lease, "failed", error={"code": "internal_error", "message": message}, message=message)


def _drop_checkpoints(lease: Lease, tenant_id: str | None) -> None:
    """A job that ended needs its checkpoints no more; removed before its status says so, so that nobody sees
    an ended job's files linger. Only while the lease holds: a successor may be resuming from them."""
    lease.check()
    if tenant_id is not None:
        checkpoints.discard(lease.settings, tenant_id, lease.job_id)


def _drop_files(lease: Lease, tenant_id: str | None) -> None:
    """A job that failed keeps nothing in the store: neither its checkpoints nor the files of an upload that failed
    half-way or of an earlier attempt that was interrupted (their rows go in _finish). Removed before its status
    says so, and only while the lease holds; failing to is only logged."""
    lease.check()
    if tenant_id is None:
        return
    try:
        make_store(lease.settings).delete_prefix(f"{tenant_id}/{lease.job_id}")
    except Exception as exc:
        log.warning("could not delete the files of failed job %s: %s", lease.job_id, exc)


def build_spec(request: dict[str, Any], model_dir: Path, settings: Settings) -> PruneSpec:
    return PruneSpec(
        model_dir=model_dir,
        method=request["method"],
        sparsity=float(request["sparsity"]),
        pattern=request.get("pattern", "unstructured"),
        calibration=CalibrationSpec(**request.get("calibration", {})),
        evaluation=EvaluationSpec(**request.get("evaluation", {})),
        device=settings.device,
        targets=request.get("targets"),
        offload=bool(request.get("offload", False)),
        allocation=AllocationSpec(name=request.get("allocation", "uniform"),
                                  **{key: value for key, value in (request.get("allocation_options") or {}).items()}),
        sweep=tuple(float(s) for s in (request.get("sweep") or {}).get("sparsities", ())),
        restore=restore_spec(request.get("restore")),
    )


def restore_spec(options: dict[str, Any] | None) -> RestoreSpec | None:
    """The request's restore object (defaults filled in by the API) as the engine's RestoreSpec."""
    if options is None:
        return None
    targets = options.get("targets")
    return RestoreSpec(**{**options, "targets": tuple(targets) if targets is not None else None})


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


def _name_dataset_as_submitted(report: dict[str, Any], request: dict[str, Any]) -> None:
    """The engine saw a scratch path; the report names the dataset as the user does (ds_...)."""
    submitted = (request.get("calibration") or {}).get("dataset")
    if submitted and submitted.startswith("ds_"):
        report.setdefault("spec", {}).setdefault("calibration", {})["dataset"] = submitted
        report.setdefault("data", {})["dataset"] = submitted
        if report["data"].get("images") not in (None, "synthetic"):  # an image-text upload's images
            report["data"]["images"] = submitted


def _name_restore_dataset_as_submitted(report: dict[str, Any], request: dict[str, Any]) -> None:
    """As for calibration: an uploaded restore dataset is named by its id, not by the file the worker fetched
    (restoration trains on the calibration dataset unless told otherwise)."""
    restore = request.get("restore")
    if not restore:
        return
    own = restore.get("dataset")
    submitted = own or (request.get("calibration") or {}).get("dataset")
    if not (submitted and submitted.startswith("ds_")):
        return
    if own and isinstance(report.get("spec", {}).get("restore"), dict):
        report["spec"]["restore"]["dataset"] = submitted
    if isinstance(report.get("data", {}).get("restore"), dict):
        report["data"]["restore"]["dataset"] = submitted


def resolve_dataset(ref: str, tenant_id: str, settings: Settings, scratch: Path) -> str:
    """Built-ins pass through to the engine; an uploaded dataset (ds_...) is fetched into the job's scratch."""
    if not ref.startswith("ds_"):
        return ref
    with session_scope(settings) as session:
        dataset = queries.get_dataset(session, tenant_id, ref)
        key = dataset.storage_key if dataset is not None else None
    if key is None:
        raise JobError("dataset_not_found", f"The dataset {ref} no longer exists (it was deleted).")
    dest = scratch / "dataset" / key.rsplit("/", 1)[-1]
    make_store(settings).download_file(key, dest)
    return str(dest)


def _start(job_id: str, settings: Settings, sent_at: datetime | None) -> Lease | None:
    """Claims the job in the database; a message for a job someone else holds (or that ended) is dropped."""
    owner = new_owner()
    with session_scope(settings) as session:
        outcome = queries.claim_job(session, job_id, owner, settings.job_lease_s,
                                    settings.max_running_jobs_per_tenant)
        if outcome == "claimed":
            job = session.get(Job, job_id)
            assert job is not None
            note = " (again, after an interrupted attempt)" if job.attempts > 1 else ""
            queries.add_event(session, job_id, f"Job started on worker {owner}{note}.",
                              data={"status": "running", "worker": owner, "attempt": job.attempts})
            return Lease(job_id, owner, job.attempts, settings)
    if outcome == "missing":
        log.warning("job %s is not in the database; dropping the message", job_id)
    elif outcome == "capped":
        _wait_for_slot(job_id, settings, sent_at)
    return None


def _wait_for_slot(job_id: str, settings: Settings, sent_at: datetime | None) -> None:
    """The tenant runs its maximum of jobs: the job stays queued and its message comes back shortly, so no
    worker sleeps on it. Only the newest message of the job comes back (duplicates from the reconciler would
    otherwise circle too); should it be lost, the reconciler re-sends the job."""
    now = utcnow()
    with session_scope(settings) as session:
        if sent_at is None:  # a message from before sent_at existed
            queries.note_enqueued(session, job_id, now)
        elif not queries.mark_enqueued(session, job_id, sent_at, now):
            return  # a newer message of this job is on its way
    log.info("job %s waits: its tenant already runs %d jobs", job_id, settings.max_running_jobs_per_tenant)
    try:
        enqueue_job(settings, job_id, sent_at=now, countdown=CAP_RETRY_S)
    except Exception as exc:
        log.warning("could not re-enqueue %s (the reconciler will): %s", job_id, exc)


def _record_progress(lease: Lease, progress: Progress) -> None:
    fraction = round(progress.done / progress.total, 4) if progress.total else 0.0
    data = {"stage": progress.stage, "done": progress.done, "total": progress.total, "fraction": fraction}
    with lease.session() as session:
        job = session.get(Job, lease.job_id)
        assert job is not None
        job.progress = data
        message = progress.message or f"{progress.stage}: {progress.done}/{progress.total}"
        queries.add_event(session, lease.job_id, message, type="progress", data=data)


def _cancel_requested(lease: Lease) -> bool:
    lease.check()  # between blocks is also where a worker that lost its lease stops
    with session_scope(lease.settings) as session:
        job = session.get(Job, lease.job_id)
        return job is None or job.status == "cancel_requested"


def _publish(lease: Lease, tenant_id: str, files: dict[str, Path]) -> None:
    job_id = lease.job_id
    store = make_store(lease.settings)
    # Each attempt uploads under its own prefix: an attempt that lost its lease cannot overwrite the files
    # that the rows of the winning attempt describe.
    prefix = f"{tenant_id}/{job_id}/attempt-{lease.attempt}"
    rows = []
    lease.check()
    for name, path in files.items():
        key = f"{prefix}/{name}"
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        store.put_file(key, path, content_type)
        rows.append(Artifact(id=new_id("art"), job_id=job_id, tenant_id=tenant_id, name=name,
                             size_bytes=path.stat().st_size, sha256=sha256_file(path), content_type=content_type,
                             storage_key=key))
    try:
        with lease.session() as session:
            # A job run again replaces the rows of an earlier attempt: one set of artifacts per job.
            session.execute(delete(Artifact).where(Artifact.job_id == job_id))
            session.add_all(rows)
            queries.add_event(session, job_id, f"Stored {len(rows)} artifacts.",
                              data={"artifacts": sorted(files)})
    except LeaseLost:
        store.delete_prefix(prefix)
        raise
    for stale in {key.rsplit("/", 1)[0] for key in store.list_keys(f"{tenant_id}/{job_id}")} - {prefix}:
        if stale.startswith(f"{tenant_id}/{job_id}/attempt-") and stale.count("/") == 2:
            store.delete_prefix(stale)  # files an interrupted attempt left behind


def _finish(lease: Lease, status: str, message: str, metrics: dict[str, Any] | None = None,
            error: dict[str, str] | None = None) -> None:
    job_id, settings = lease.job_id, lease.settings
    with lease.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status, job.finished_at, job.error = status, utcnow(), error
        job.lease_owner, job.lease_expires_at = None, None
        if status != "succeeded":  # rows an interrupted earlier attempt committed: only a success has artifacts
            session.execute(delete(Artifact).where(Artifact.job_id == job_id))
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
    if "restore" in metrics:
        restore = metrics["restore"]
        kept = "pruned zeros kept" if restore["mask_preserved"] else "pruned zeros not kept"
        parts.append(f"restored with {restore['method']} in {restore['steps']} steps (loss {restore['loss_first']:.4f} "
                     f"-> {restore['loss_last']:.4f}, {kept})")
    return "Job succeeded: " + ", ".join(parts) + "."


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


