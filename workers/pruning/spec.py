"""The engine's plain-data contract: what a job asks for, what it reports while running, what it returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The names and defaults are the vocabulary's (the API validates against the same); re-exported for the engine.
from prunekit.vocabulary import (
    ALLOCATION,
    ALLOCATIONS,
    ARCHIVE_LIMITS,
    BUDGET,
    CALIBRATION,
    EVALUATION,
    GRANULARITIES,
    OFFLOAD,
    OUTPUT_SHARD_BYTES,
    PATTERN,
    RESTORE,
    RESTORE_METHODS,
    STAGES,
    ArchiveLimits,
    offload_mode,
    scoring_defaults,
)

__all__ = ["ALLOCATIONS", "DEFAULT_CALIBRATION_DATASET", "GRANULARITIES", "RESTORE_METHODS", "STAGES",
           "AllocationSpec", "ArchiveLimits", "BudgetSpec", "CalibrationSpec", "EvaluationSpec", "JobCancelled",
           "JobError", "Progress", "PruneSpec", "RestoreSpec", "Result"]

DEFAULT_CALIBRATION_DATASET = CALIBRATION.dataset


@dataclass(frozen=True)
class CalibrationSpec:
    # builtin:wiki-en | builtin:digits (image-text) | a local .txt / .jsonl (field "text") / image-text .zip path.
    # A CLIP model left at the default calibrates on builtin:digits instead (multimodal.calibration_dataset).
    dataset: str = DEFAULT_CALIBRATION_DATASET
    num_samples: int = CALIBRATION.num_samples
    seq_len: int = CALIBRATION.seq_len
    seed: int = CALIBRATION.seed
    # What an uploaded image-text archive may hold: the worker passes the limits the API checked it with.
    archive_limits: ArchiveLimits = ARCHIVE_LIMITS


@dataclass(frozen=True)
class EvaluationSpec:
    perplexity: bool = EVALUATION.perplexity  # causal LMs, LLaVA and BLIP-2 (their language model, on text alone)
    # CLIP-style models: zero-shot accuracy on the held-out split of builtin:digits (its ten digit prompts).
    # A flag of its own rather than reusing `perplexity`: a job may want one measurement without the other.
    accuracy: bool = EVALUATION.accuracy
    num_samples: int = EVALUATION.num_samples  # evaluation windows
    seq_len: int = EVALUATION.seq_len
    # multiple-choice tasks scored dense and pruned (task_accuracy.py): builtin:wiki-next-sentence, an
    # uploaded task file by its id (ds_...), or a local .jsonl path; the first task_num_samples items of each.
    tasks: tuple[str, ...] = EVALUATION.tasks
    task_num_samples: int = EVALUATION.task_num_samples
    # Where the worker fetched uploaded task files: {ds_... id: local path}. Not part of what the job asked (a
    # folder of the attempt's own): spec_record leaves it out, so metrics and checkpoints name the id.
    task_files: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))  # a request's JSON list


@dataclass(frozen=True)
class AllocationSpec:
    """How sparse each block (or layer) is; `uniform` gives every layer the job's sparsity."""

    name: str = ALLOCATION.name  # one of ALLOCATIONS
    granularity: str = ALLOCATION.granularity  # one of GRANULARITIES: one sparsity per block, or per layer
    # ECoFLaP: no group is pruned beyond this; None means the target + 0.1 (capped below 1).
    max_sparsity: float | None = ALLOCATION.max_sparsity
    # Calibration samples the scores are estimated on (the first ones), and tokens per scoring sample (None: the
    # calibration's). Left out, vocabulary.scoring_defaults chooses them (and perturbation) in __post_init__.
    num_samples: int = ALLOCATION.num_samples  # type: ignore[assignment]
    seq_len: int | None = ALLOCATION.seq_len
    eps: float = ALLOCATION.eps  # ecoflap-zeroth: the perturbation's size
    # owl: M, a weight is an outlier above M times its group's mean score
    outlier_multiple: float = ALLOCATION.outlier_multiple
    spread: float = ALLOCATION.spread  # owl: lambda, sparsities lie in [target - lambda, target + lambda]
    # --- allocation options of alphapruning, dlp and ecoflap-zeroth ---
    # ecoflap-zeroth: "tensor", one random direction per weight matrix; "block", one per block (7x fewer passes)
    perturbation: str = ALLOCATION.perturbation  # type: ignore[assignment]
    # alphapruning: sparsities proportional to [1 - epsilon, 1 + epsilon] mapped from the heavy-tail exponents
    epsilon: float = ALLOCATION.epsilon
    alpha: float = ALLOCATION.alpha  # dlp: sparsities lie in [target - alpha, target + alpha]

    def __post_init__(self) -> None:
        chosen = scoring_defaults(self.name, self.granularity, self.perturbation, self.num_samples, self.seq_len)
        for name, value in zip(("perturbation", "num_samples", "seq_len"), chosen, strict=True):
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class RestoreSpec:
    """LoRA fine-tuning after pruning. "sparse-lora" trains and merges (W + s*B*A) masked by the pruned mask, so
    the merged model keeps exactly the pruned zeros; "lora" is plain LoRA, for comparison (it fills them in)."""

    method: str = RESTORE.method  # one of RESTORE_METHODS
    steps: int = RESTORE.steps
    rank: int = RESTORE.rank
    alpha: float = RESTORE.alpha  # the update is scaled by alpha / rank
    lr: float = RESTORE.lr
    distill: float = RESTORE.distill  # lambda: loss = (1 - lambda) * task loss + lambda * KL(dense teacher || student)
    batch_size: int = RESTORE.batch_size
    # Linear warm-up: a number of steps, or a fraction of `steps` when in (0, 1).
    warmup_steps: float = RESTORE.warmup_steps
    dataset: str | None = None  # None: the calibration dataset (as the job resolved it)
    targets: tuple[str, ...] | None = None  # layer-name suffixes ("q_proj", "mlp.fc1"); None: every pruned layer
    # What an uploaded image-text archive may hold (as for calibration).
    archive_limits: ArchiveLimits = ARCHIVE_LIMITS


@dataclass(frozen=True)
class BudgetSpec:
    """A quality-budget job: the highest sparsity of the grid min_sparsity, min_sparsity + step, ..., max_sparsity
    whose pruned model keeps the bound (exactly one of the two), measured on the evaluation data
    (workers/pruning/budget_search.py)."""

    max_perplexity_ratio: float | None = None  # pruned perplexity / dense perplexity, at most this (> 1)
    max_accuracy_drop: float | None = None  # CLIP-style: dense accuracy - pruned accuracy, at most this
    min_sparsity: float = BUDGET.min_sparsity
    max_sparsity: float = BUDGET.max_sparsity
    step: float = BUDGET.step


@dataclass(frozen=True)
class PruneSpec:
    model_dir: Path  # HF layout (config.json + *.safetensors + tokenizer) or a folder with exactly one .gguf
    method: str  # "magnitude" | "wanda" | "sparsegpt"
    sparsity: float  # in (0, 1)
    pattern: str = PATTERN
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    device: str = "cpu"  # "cpu" | "cuda" | "auto"
    # Per-tower sparsity ({"vision": 0.5, "language": 0.7}); only the named towers are pruned. None: `sparsity`
    # for every tower of DEFAULT_TOWERS the model has (vision and language; the Q-Former only when named).
    targets: dict[str, float] | None = None
    # Where the model lives while it is pruned, one of OFFLOAD_MODES: "memory"; "cpu", the model in CPU memory and
    # one block at a time on `device` (models larger than the device); "disk", streamed from its files one block at
    # a time, pruned blocks written straight to the output (models larger than memory). The API's booleans are
    # accepted too (true is "cpu").
    offload: str = offload_mode(OFFLOAD)
    allocation: AllocationSpec = field(default_factory=AllocationSpec)
    # A sweep: these sparsities from one calibration and scoring pass, one pruned model each (`sparsity` is
    # then ignored; `targets` must be None). Empty for an ordinary job.
    sweep: tuple[float, ...] = ()
    # Fine-tuning after pruning (every sparsity of a sweep is restored); None: the pruned model is saved as is.
    restore: RestoreSpec | None = None
    # A quality-budget job: the sparsity is searched for (`sparsity` is then ignored; `targets` and `sweep` must
    # be empty, the pattern unstructured); the chosen model is restored when `restore` is given.
    budget: BudgetSpec | None = None
    # The worker's memory budget: a job left in memory whose model (as loaded for compute) exceeds it is streamed
    # from disk instead. None: no budget, the job's `offload` as it is. The worker's, not the job's: it decides
    # no weight.
    memory_budget_mb: int | None = None
    # The pruned model is written in Hugging Face's sharded layout, shards of at most this many bytes.
    output_shard_bytes: int = OUTPUT_SHARD_BYTES

    def __post_init__(self) -> None:
        object.__setattr__(self, "offload", offload_mode(self.offload))


# What the worker adds to a job and that decides no weight: left out of checkpoint fingerprints.
WORKER_FIELDS = ("memory_budget_mb", "output_shard_bytes")


def spec_record(spec: PruneSpec) -> dict[str, Any]:
    """The spec as plain data for the report and the checkpoint fingerprint: what the job asked for. The archive
    limits are the server's, not the job's; they decide no weight, and a change of them must not orphan a
    checkpoint."""
    record = asdict(spec)
    for part in ("calibration", "restore"):
        if isinstance(record.get(part), dict):
            record[part].pop("archive_limits", None)
    record["evaluation"].pop("task_files", None)  # the attempt's scratch paths
    return record


@dataclass(frozen=True)
class Progress:
    stage: str  # one of STAGES
    done: int
    total: int
    message: str = ""


class JobError(Exception):
    """A failure the user can act on: `code` is stable snake_case, `message` a readable sentence."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class JobCancelled(Exception):
    """Raised between units of work once the caller's should_cancel() answers True."""


@dataclass
class Result:
    output_dir: Path  # the saved HF folder of the pruned model
    metrics: dict[str, Any]
    report: dict[str, Any]
