"""The contract's vocabulary: names, defaults, limits and pure rules. Standard library only.

The API (app/), the tasks layer and the engine (workers/) all read it, so a name, a default or a limit is written
once and cannot drift between the side that accepts a job and the side that runs it.
"""

from prunekit.vocabulary.defaults import (
    ALLOCATION,
    CALIBRATION,
    EVALUATION,
    OFFLOAD,
    PATTERN,
    RESTORE,
    AllocationDefaults,
    CalibrationDefaults,
    EvaluationDefaults,
    RestoreDefaults,
)
from prunekit.vocabulary.limits import ARCHIVE_LIMITS, LIMITS, MAX_UPLOAD_BYTES, ArchiveLimits
from prunekit.vocabulary.names import (
    ALLOCATIONS,
    BUILTIN_DATASETS,
    DATASET_KINDS,
    DEFAULT_TOWERS,
    DIGITS,
    ENDED,
    GRANULARITIES,
    IMAGE_TEXT,
    METHODS,
    MODEL_FAMILIES,
    MODEL_SCHEMES,
    OUT_OF_MEMORY,
    PATTERNS,
    RESTORE_METHODS,
    STAGES,
    TEXT,
    TOWERS,
    UNIFORM,
    UNSTRUCTURED,
    VISION_MODEL_TYPES,
    WIKI_EN,
    JobStatus,
)
from prunekit.vocabulary.rules import (
    MAX_SPARSITY_CAP,
    MAX_SPARSITY_MARGIN,
    SPARSITY_TOLERANCE,
    allocation_decides,
    allocation_fits_pattern,
    default_max_sparsity,
    fits_pattern,
    fixed_sparsity,
    in_open_unit,
    nm_pattern,
    parse_pattern,
    same_sparsity,
    sweep_fits_pattern,
)

__all__ = [
    "ALLOCATION", "ALLOCATIONS", "ARCHIVE_LIMITS", "BUILTIN_DATASETS", "CALIBRATION", "DATASET_KINDS",
    "DEFAULT_TOWERS", "DIGITS", "ENDED", "EVALUATION", "GRANULARITIES", "IMAGE_TEXT", "LIMITS", "MAX_SPARSITY_CAP",
    "MAX_SPARSITY_MARGIN", "MAX_UPLOAD_BYTES", "METHODS", "MODEL_FAMILIES", "MODEL_SCHEMES", "OFFLOAD", "OUT_OF_MEMORY",
    "PATTERN", "PATTERNS", "RESTORE", "RESTORE_METHODS", "SPARSITY_TOLERANCE", "STAGES", "TEXT", "TOWERS", "UNIFORM",
    "UNSTRUCTURED", "VISION_MODEL_TYPES", "WIKI_EN", "AllocationDefaults", "ArchiveLimits", "CalibrationDefaults",
    "EvaluationDefaults", "JobStatus", "RestoreDefaults", "allocation_decides", "allocation_fits_pattern",
    "default_max_sparsity", "fits_pattern", "fixed_sparsity", "in_open_unit", "nm_pattern", "parse_pattern",
    "same_sparsity", "sweep_fits_pattern",
]
