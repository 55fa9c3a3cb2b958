"""The contract's vocabulary: names, defaults, limits and pure rules. Standard library only.

The API (app/), the tasks layer and the engine (workers/) all read it, so a name, a default or a limit is written
once and cannot drift between the side that accepts a job and the side that runs it.
"""

from prunekit.vocabulary.defaults import (
    ALLOCATION,
    BUDGET,
    CALIBRATION,
    EVALUATION,
    MEMORY_BUDGET_SHARE,
    OFFLOAD,
    PATTERN,
    RESTORE,
    AllocationDefaults,
    BudgetDefaults,
    CalibrationDefaults,
    EvaluationDefaults,
    RestoreDefaults,
    scoring_defaults,
)
from prunekit.vocabulary.limits import (
    ARCHIVE_LIMITS,
    LIMITS,
    MAX_MODEL_UPLOAD_BYTES,
    MAX_UPLOAD_BYTES,
    MODEL_ARCHIVE_LIMITS,
    OUTPUT_SHARD_BYTES,
    ArchiveLimits,
)
from prunekit.vocabulary.names import (
    ALLOCATIONS,
    BUDGET_BOUNDS,
    BUDGET_UNREACHABLE,
    BUILTIN_DATASETS,
    DATASET_KINDS,
    DEFAULT_TOWERS,
    DIGITS,
    ENDED,
    GRANULARITIES,
    IMAGE_TEXT,
    JOB_MODEL_SCHEME,
    METHODS,
    MODEL_FAMILIES,
    MODEL_ID_PREFIX,
    MODEL_SCHEMES,
    MODEL_STATUSES,
    OFFLOAD_CPU,
    OFFLOAD_DISK,
    OFFLOAD_MEMORY,
    OFFLOAD_MODES,
    OUT_OF_MEMORY,
    PATTERNS,
    PERTURBATIONS,
    RESTORE_METHODS,
    STAGES,
    SWEEP_FOLDER,
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
    offload_mode,
    parse_job_model_ref,
    parse_pattern,
    same_sparsity,
    sweep_fits_pattern,
    sweep_folder,
)

__all__ = [
    "ALLOCATION", "ALLOCATIONS", "ARCHIVE_LIMITS", "BUILTIN_DATASETS", "CALIBRATION", "DATASET_KINDS",
    "DEFAULT_TOWERS", "DIGITS", "ENDED", "EVALUATION", "GRANULARITIES", "IMAGE_TEXT", "LIMITS", "MAX_SPARSITY_CAP",
    "MAX_SPARSITY_MARGIN", "MAX_UPLOAD_BYTES", "METHODS", "MODEL_FAMILIES", "MODEL_SCHEMES", "OFFLOAD", "OUT_OF_MEMORY",
    "PATTERN", "PATTERNS", "RESTORE", "RESTORE_METHODS", "SPARSITY_TOLERANCE", "STAGES", "TEXT", "TOWERS", "UNIFORM",
    "UNSTRUCTURED", "VISION_MODEL_TYPES", "WIKI_EN", "AllocationDefaults", "ArchiveLimits", "CalibrationDefaults",
    "EvaluationDefaults", "JobStatus", "RestoreDefaults", "allocation_decides", "allocation_fits_pattern",
    "default_max_sparsity", "fits_pattern", "fixed_sparsity", "in_open_unit", "nm_pattern", "parse_pattern",
    "same_sparsity", "scoring_defaults", "sweep_fits_pattern",
    # Quality-budget jobs.
    "BUDGET", "BUDGET_BOUNDS", "BUDGET_UNREACHABLE", "BudgetDefaults",
    # Tenant models and chained jobs.
    "JOB_MODEL_SCHEME", "MAX_MODEL_UPLOAD_BYTES", "MODEL_ARCHIVE_LIMITS", "MODEL_ID_PREFIX", "MODEL_STATUSES",
    "SWEEP_FOLDER", "parse_job_model_ref", "sweep_folder",
    # Task accuracy.
    "BUILTIN_TASKS", "TASK", "TASK_LIMITS", "WIKI_NEXT_SENTENCE", "task_record_problem",
    # ecoflap-zeroth's directions.
    "PERTURBATIONS",
    # Where a job's model lives while it is pruned (streaming from disk included), and the worker's memory budget.
    "MEMORY_BUDGET_SHARE", "OFFLOAD_CPU", "OFFLOAD_DISK", "OFFLOAD_MEMORY", "OFFLOAD_MODES", "offload_mode",
    # Sharded model output.
    "OUTPUT_SHARD_BYTES",
]

# --- task accuracy ---------------------------------------------------------------------------------
from prunekit.vocabulary.limits import TASK_LIMITS  # noqa: E402
from prunekit.vocabulary.names import BUILTIN_TASKS, TASK, WIKI_NEXT_SENTENCE  # noqa: E402
from prunekit.vocabulary.rules import task_record_problem  # noqa: E402
