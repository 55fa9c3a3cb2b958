"""A job's inputs fetched for the engine (an `s3://` model, uploaded datasets), and named in its report as the user
submitted them."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from prunekit.core.config import Settings
from prunekit.core.db import queries
from prunekit.core.db.session import session_scope
from prunekit.core.storage import ArtifactStore, S3Store, parse_s3_url
from prunekit.vocabulary import MODEL_ID_PREFIX, JobStatus, parse_job_model_ref, same_sparsity, sweep_folder
from workers.pruning.models import resolve_model_ref
from workers.pruning.spec import JobError, PruneSpec

log = logging.getLogger("prunekit.worker")


def resolve_model(ref: str, settings: Settings, dest: Path, tenant_id: str | None = None,
                  store: ArtifactStore | None = None) -> Path:
    """`s3://` folders, a tenant's models (mdl_...) and finished jobs' models (job:...) are fetched by this layer (it
    owns storage); `local:` and `hf:` by the engine."""
    if ref.startswith(f"{MODEL_ID_PREFIX}_") or parse_job_model_ref(ref) is not None:
        assert tenant_id is not None and store is not None
        return _fetch_tenant_model(ref, tenant_id, settings, store, dest)
    if not ref.startswith("s3://"):
        assert settings.models_root is not None and settings.hf_cache_dir is not None
        return resolve_model_ref(ref, settings.models_root, settings.hf_cache_dir)
    return _fetch_s3(ref, settings, dest)


class ModelFetchFailed(JobError):
    """The model's files could not be fetched: no fault of the model's own (it is not marked failed for it)."""


def _fetch_tenant_model(ref: str, tenant_id: str, settings: Settings, store: ArtifactStore, dest: Path) -> Path:
    """The files of a tenant's model, or of a finished job's pruned model, into dest."""
    parent = parse_job_model_ref(ref)
    with session_scope(settings) as session:
        if parent is None:
            model = queries.get_model(session, tenant_id, ref)
            source = None if model is None else (model.storage_prefix, model.source)
            keys = None
        else:
            source = None
            keys = _parent_keys(session, tenant_id, *parent)
    if parent is None:
        if source is None:
            raise ModelFetchFailed("model_load_failed", f"The model {ref} no longer exists (it was deleted).")
        prefix, origin = source
        if prefix is None:  # a registered s3:// prefix, read in place
            return _fetch_s3(origin, settings, dest)
        keys = {key.removeprefix(prefix + "/"): key for key in store.list_keys(prefix)}
    assert keys is not None
    if not keys:
        raise ModelFetchFailed("model_load_failed", f"The files of {ref} are gone.")
    for name, key in keys.items():
        store.download_file(key, dest / name)
    return dest


def _parent_keys(session: Any, tenant_id: str, job_id: str, sparsity: str | None) -> dict[str, str]:
    """file name -> storage key of the parent job's pruned model (its report left out)."""
    job = queries.get_job(session, tenant_id, job_id)
    if job is None or job.status != JobStatus.SUCCEEDED:
        raise ModelFetchFailed("model_load_failed", f"Job {job_id} has no pruned model to start from.")
    folder = ""
    if sparsity is not None:
        swept = [float(s) for s in (job.request.get("sweep") or {}).get("sparsities", ())]
        match = next((s for s in swept if same_sparsity(s, float(sparsity))), None)
        if match is None:
            raise ModelFetchFailed("model_load_failed", f"Job {job_id} has no model at sparsity {sparsity}.")
        folder = sweep_folder(match) + "/"
    keys = {}
    for artifact in queries.list_artifacts(session, job_id):
        name = artifact.name
        if not name.startswith(folder) or name == "report.json":
            continue
        rest = name[len(folder):]
        if "/" in rest:  # another sweep member's folder, at the top level of a sweep
            continue
        keys[rest] = artifact.storage_key
    return keys


def _fetch_s3(ref: str, settings: Settings, dest: Path) -> Path:
    bucket, prefix = parse_s3_url(ref)
    # The user's bucket, not the artifact store: a client of its own.
    store = S3Store(bucket=bucket, prefix=prefix, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
                    part_size_mb=settings.s3_part_size_mb)
    try:
        keys = store.list_keys("")
    except Exception as exc:
        raise JobError("model_load_failed", f"Could not list {ref}: {exc}") from exc
    if not keys:
        raise JobError("model_load_failed", f"No files under {ref}.")
    for key in keys:
        store.download_file(key, dest / key)
    return dest


# Job errors that say the model itself cannot be loaded (not that it could not be fetched).
MODEL_FAULTS = ("model_load_failed", "invalid_model")


def note_model_failure(request: dict[str, Any], tenant_id: str, settings: Settings, error: JobError) -> None:
    """A tenant's model the engine could not load is marked failed with the loader's message: GET /v1/models says
    why, and later jobs naming it are refused at submission instead of failing one by one."""
    ref = request.get("model", "")
    if not ref.startswith(f"{MODEL_ID_PREFIX}_") or error.code not in MODEL_FAULTS or isinstance(error,
                                                                                                  ModelFetchFailed):
        return
    try:
        with session_scope(settings) as session:
            queries.mark_model_failed(session, tenant_id, ref, {"code": error.code, "message": error.message[:2000]})
    except Exception as exc:  # the job's own failure matters more than this note of it
        log.warning("could not mark model %s failed: %s", ref, exc)


def name_model_as_submitted(report: dict[str, Any], request: dict[str, Any]) -> None:
    """The engine saw a scratch folder; the report names the model as the user did, and a chained job its parent
    (the job whose pruned model it started from, and which of a sweep's models)."""
    ref = request.get("model")
    if not isinstance(ref, str):
        return
    if isinstance(report.get("model"), dict):
        report["model"]["ref"] = ref
    parent = parse_job_model_ref(ref)
    if parent is not None:
        job_id, sparsity = parent
        report["parent"] = {"job": job_id, "sparsity": float(sparsity) if sparsity is not None else None,
                            "model": ref}


def resolve_datasets(spec: PruneSpec, tenant_id: str, settings: Settings, store: ArtifactStore,
                     scratch: Path) -> PruneSpec:
    """The spec with its uploaded datasets (calibration, restore) fetched into the job's scratch."""
    spec = replace(spec, calibration=replace(
        spec.calibration, dataset=resolve_dataset(spec.calibration.dataset, tenant_id, settings, store, scratch)))
    if spec.restore is not None and spec.restore.dataset is not None:
        spec = replace(spec, restore=replace(
            spec.restore, dataset=resolve_dataset(spec.restore.dataset, tenant_id, settings, store, scratch)))
    task_files = {ref: resolve_dataset(ref, tenant_id, settings, store, scratch)
                  for ref in spec.evaluation.tasks if ref.startswith("ds_")}
    if task_files:
        spec = replace(spec, evaluation=replace(spec.evaluation, task_files=task_files))
    return spec


def resolve_dataset(ref: str, tenant_id: str, settings: Settings, store: ArtifactStore, scratch: Path) -> str:
    """Built-ins pass through to the engine; an uploaded dataset (ds_...) is fetched into the job's scratch, in a
    folder named by its id: every upload is stored as data.jsonl or data.txt, so a calibration set, a restore set
    and task files of one job would otherwise overwrite each other."""
    if not ref.startswith("ds_"):
        return ref
    with session_scope(settings) as session:
        dataset = queries.get_dataset(session, tenant_id, ref)
        key = dataset.storage_key if dataset is not None else None
    if key is None:
        raise JobError("dataset_not_found", f"The dataset {ref} no longer exists (it was deleted).")
    dest = scratch / "datasets" / ref / key.rsplit("/", 1)[-1]
    store.download_file(key, dest)
    return str(dest)


def name_datasets_as_submitted(report: dict[str, Any], request: dict[str, Any]) -> None:
    """The engine saw scratch paths; the report names uploaded datasets as the user does (ds_...)."""
    _name_calibration_dataset(report, request)
    _name_restore_dataset(report, request)


def _name_calibration_dataset(report: dict[str, Any], request: dict[str, Any]) -> None:
    submitted = (request.get("calibration") or {}).get("dataset")
    if submitted and submitted.startswith("ds_"):
        report.setdefault("spec", {}).setdefault("calibration", {})["dataset"] = submitted
        report.setdefault("data", {})["dataset"] = submitted
        if report["data"].get("images") not in (None, "synthetic"):  # an image-text upload's images
            report["data"]["images"] = submitted


def _name_restore_dataset(report: dict[str, Any], request: dict[str, Any]) -> None:
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
