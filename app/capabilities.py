"""What this server can do: the vocabulary's names and limits, as request validation and GET /v1/capabilities
share them. The names themselves live in prunekit.vocabulary, which the engine runs too."""

from __future__ import annotations

from typing import Any

from prunekit.core.config import Settings
from prunekit.vocabulary import (
    ALLOCATIONS,
    BUILTIN_DATASETS,
    LIMITS,
    METHODS,
    MODEL_FAMILIES,
    MODEL_SCHEMES,
    PATTERNS,
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
                   "running_jobs_per_tenant": settings.max_running_jobs_per_tenant}
    return {
        "object": "capabilities",
        "methods": list(METHODS),
        "patterns": list(PATTERNS),
        "allocations": list(ALLOCATIONS),
        "restorations": list(RESTORATIONS),
        "model_families": list(MODEL_FAMILIES),
        "model_schemes": [f"{s}:" for s in MODEL_SCHEMES],
        "datasets": [{"id": k, "kind": v} for k, v in BUILTIN_DATASETS.items()],
        "limits": limits,
    }
