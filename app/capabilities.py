"""What this server can do: the vocabulary's names and limits, as request validation and GET /v1/capabilities
share them. The names themselves live in prunekit.vocabulary, which the engine runs too."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prunekit.core.config import Settings
from prunekit.vocabulary import (
    ALLOCATION,
    ALLOCATIONS,
    BUDGET,
    BUDGET_BOUNDS,
    BUILTIN_DATASETS,
    BUILTIN_TASKS,
    GRANULARITIES,
    LIMITS,
    METHODS,
    MODEL_FAMILIES,
    MODEL_SCHEMES,
    PATTERNS,
    PERTURBATIONS,
    RESTORE_METHODS,
    TOWERS,
    VISION_MODEL_TYPES,
)

__all__ = ["ALLOCATIONS", "BUILTIN_DATASETS", "LIMITS", "METHODS", "MODEL_FAMILIES", "MODEL_SCHEMES", "PATTERNS",
           "RESTORATIONS", "TOWERS", "VISION_MODEL_TYPES", "capabilities"]

# The contract's name for the restore methods (the `restorations` of /v1/capabilities).
RESTORATIONS = RESTORE_METHODS


def capabilities(settings: Settings | None = None) -> dict[str, Any]:
    """With settings, the limits a deployment sets by environment (uploads, archives, running jobs) are listed
    beside the fixed ones: the values the API checks an upload with and the worker reads it with."""
    limits: dict[str, Any] = dict(LIMITS)
    if settings is not None:
        archive = settings.archive_limits()
        limits |= {"upload_bytes": settings.max_upload_bytes, "dataset_records": archive.max_records,
                   "zip_members": archive.max_members, "zip_uncompressed_bytes": archive.max_total_bytes,
                   "zip_member_bytes": archive.max_member_bytes, "zip_compression_ratio": archive.max_ratio,
                   "zip_text_chars": archive.max_text_chars,
                   "running_jobs_per_tenant": settings.max_running_jobs_per_tenant,
                   # a tenant's model archive (POST /v1/models)
                   "model_upload_bytes": settings.max_model_upload_bytes, "model_files": settings.max_model_files,
                   "model_bytes": settings.max_model_bytes}
    return {
        "object": "capabilities",
        "methods": list(METHODS),
        "patterns": list(PATTERNS),
        "allocations": list(ALLOCATIONS),
        "restorations": list(RESTORATIONS),
        "model_families": list(MODEL_FAMILIES),
        "model_schemes": [f"{s}:" for s in MODEL_SCHEMES],
        "datasets": [{"id": k, "kind": v} for k, v in BUILTIN_DATASETS.items()],
        # the built-in tasks of evaluation.tasks (an uploaded task file is named by its id).
        "tasks": list(BUILTIN_TASKS),
        "limits": limits,
        # Quality-budget jobs: the bounds a `budget` may name, and its grid's defaults.
        "budget": {"bounds": list(BUDGET_BOUNDS), "min_sparsity": BUDGET.min_sparsity,
                   "max_sparsity": BUDGET.max_sparsity, "step": BUDGET.step},
        # what allocation_options may choose, and the defaults of the options (the papers' own).
        "allocation_options": {"granularities": list(GRANULARITIES), "perturbations": list(PERTURBATIONS),
                               "defaults": {k: v for k, v in asdict(ALLOCATION).items() if k != "name"}},
    }
