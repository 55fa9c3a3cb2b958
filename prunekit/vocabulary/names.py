"""The contract's names: what a job may ask for, and what the service reports back.

The API validates against these, /v1/capabilities lists them and the engine runs them; a test checks that the
engine's registries hold exactly these names, so a name cannot be added on one side only.
"""

from __future__ import annotations

from enum import StrEnum

METHODS = ("magnitude", "wanda", "sparsegpt")
UNSTRUCTURED = "unstructured"
PATTERNS = (UNSTRUCTURED, "2:4", "4:8")
UNIFORM = "uniform"
ALLOCATIONS = (UNIFORM, "ecoflap-zeroth", "ecoflap-first", "owl", "alphapruning", "dlp")
# ecoflap-zeroth: one random direction per weight matrix, or one per block (allocation_options.perturbation).
PERTURBATIONS = ("tensor", "block")
# One sparsity per block, or per layer (allocation_options.granularity).
GRANULARITIES = ("block", "layer")
RESTORE_METHODS = ("sparse-lora", "lora")
# Where a job's model lives while it is pruned (the spec's `offload`): all of it in memory; in CPU memory with one
# block at a time on the device (the API's `offload: true` or "cpu"); or streamed from its files on disk, one block
# at a time, the pruned blocks written straight to the output ("disk").
OFFLOAD_MEMORY = "memory"
OFFLOAD_CPU = "cpu"
OFFLOAD_DISK = "disk"
OFFLOAD_MODES = (OFFLOAD_MEMORY, OFFLOAD_CPU, OFFLOAD_DISK)
# Towers a job's `targets` may name (per-tower sparsity of vision-language models; CLIP's text is "language").
TOWERS = ("vision", "qformer", "language")
# The towers pruned when a job names none: the Q-Former only when named.
DEFAULT_TOWERS = ("vision", "language")

WIKI_EN = "builtin:wiki-en"
DIGITS = "builtin:digits"
TEXT = "text"
IMAGE_TEXT = "image-text"
DATASET_KINDS = (TEXT, IMAGE_TEXT)
BUILTIN_DATASETS = {WIKI_EN: TEXT, DIGITS: IMAGE_TEXT}

# Families the engine has a tiny test model of (prunekit/fixtures/demo_models.py) and prunes end to end.
MODEL_FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "opt", "clip", "llava", "blip-2")
# config.json model_type of the families with a vision tower: the only ones an image-text dataset can calibrate.
VISION_MODEL_TYPES = ("clip", "llava", "blip-2")
MODEL_SCHEMES = ("local", "hf", "s3", "job")
# --- models a tenant brings (POST /v1/models) and chained jobs --------------------------------------------
# A tenant's model is named in a job's `model` by its id, as an uploaded dataset is: mdl_<ULID>.
MODEL_ID_PREFIX = "mdl"
# A finished job's pruned model as another job's input: job:<id>, or job:<id>/sparsity-<s> for one of a sweep's.
JOB_MODEL_SCHEME = "job"
SWEEP_FOLDER = "sparsity-"
# What GET /v1/models says of a model: usable now, still being built (a server model), or refused by the worker.
MODEL_STATUSES = ("ready", "building", "failed")

# The engine's stages, in the order a job passes them (scoring and restoring only when asked for).
# budget_search: a budget job's probes, each a pruning pass (reported under `pruning`) and a measurement.
STAGES = ("loading", "calibration", "evaluation_dense", "scoring", "budget_search", "pruning", "restoring",
          "evaluation_pruned", "saving")
# The quality bounds a budget job may name (`budget`): one of them.
BUDGET_BOUNDS = ("max_perplexity_ratio", "max_accuracy_drop")


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCEL_REQUESTED = "cancel_requested"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# A job in one of these never changes again.
ENDED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

# Job error codes (`error.code` of a failed job) for faults of the worker's surroundings rather than of the request.
DISK_FULL = "disk_full"  # the worker's scratch disk (WORK_DIR) filled up
STORAGE_UNAVAILABLE = "storage_unavailable"  # the artifact store stayed unreachable for STORAGE_RETRY_S
INTERNAL_ERROR = "internal_error"  # anything unexpected
# The job's worker died without reporting on each of JOB_MAX_ATTEMPTS attempts (as a rule, killed for memory).
OUT_OF_MEMORY = "out_of_memory"
# A budget job whose lowest sparsity already breaks its quality bound.
BUDGET_UNREACHABLE = "budget_unreachable"

# --- task accuracy (evaluation.tasks) --------------------------------------------------------------
# An uploaded .jsonl of multiple-choice items ({"context", "choices", "answer"}) is a dataset of this kind.
TASK = "task"
# The built-in task: the true next sentence of a held-out wiki-en article among four.
WIKI_NEXT_SENTENCE = "builtin:wiki-next-sentence"
BUILTIN_TASKS = (WIKI_NEXT_SENTENCE,)
