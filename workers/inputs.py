"""A job's inputs fetched for the engine (an `s3://` model, uploaded datasets), and named in its report as the user
submitted them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from prunekit.core.config import Settings
from prunekit.core.db import queries
from prunekit.core.db.session import session_scope
from prunekit.core.storage import ArtifactStore, S3Store, parse_s3_url
from workers.pruning.models import resolve_model_ref
from workers.pruning.spec import JobError, PruneSpec


def resolve_model(ref: str, settings: Settings, dest: Path) -> Path:
    """`s3://` folders are fetched by this layer (it owns storage); `local:` and `hf:` by the engine."""
    if not ref.startswith("s3://"):
        assert settings.models_root is not None and settings.hf_cache_dir is not None
        return resolve_model_ref(ref, settings.models_root, settings.hf_cache_dir)
    bucket, prefix = parse_s3_url(ref)
    # The user's bucket, not the artifact store: a client of its own.
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


def resolve_datasets(spec: PruneSpec, tenant_id: str, settings: Settings, store: ArtifactStore,
                     scratch: Path) -> PruneSpec:
    """The spec with its uploaded datasets (calibration, restore) fetched into the job's scratch."""
    spec = replace(spec, calibration=replace(
        spec.calibration, dataset=resolve_dataset(spec.calibration.dataset, tenant_id, settings, store, scratch)))
    if spec.restore is not None and spec.restore.dataset is not None:
        spec = replace(spec, restore=replace(
            spec.restore, dataset=resolve_dataset(spec.restore.dataset, tenant_id, settings, store, scratch)))
    return spec


def resolve_dataset(ref: str, tenant_id: str, settings: Settings, store: ArtifactStore, scratch: Path) -> str:
    """Built-ins pass through to the engine; an uploaded dataset (ds_...) is fetched into the job's scratch."""
    if not ref.startswith("ds_"):
        return ref
    with session_scope(settings) as session:
        dataset = queries.get_dataset(session, tenant_id, ref)
        key = dataset.storage_key if dataset is not None else None
    if key is None:
        raise JobError("dataset_not_found", f"The dataset {ref} no longer exists (it was deleted).")
    dest = scratch / "dataset" / key.rsplit("/", 1)[-1]
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
