"""The engine's plain-data contract: what a job asks for, what it reports while running, what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("loading", "calibration", "evaluation_dense", "scoring", "pruning", "restoring", "evaluation_pruned",
          "saving")


DEFAULT_CALIBRATION_DATASET = "builtin:wiki-en"


@dataclass(frozen=True)
class CalibrationSpec:
    # builtin:wiki-en | builtin:digits (image-text) | a local .txt / .jsonl (field "text") / image-text .zip path.
    # A CLIP model left at the default calibrates on builtin:digits instead (multimodal.calibration_dataset).
    dataset: str = DEFAULT_CALIBRATION_DATASET
    num_samples: int = 64
    seq_len: int = 512
    seed: int = 0


@dataclass(frozen=True)
class EvaluationSpec:
    perplexity: bool = True  # causal LMs, LLaVA and BLIP-2 (their language model, on text alone)
    # CLIP-style models: zero-shot accuracy on the held-out split of builtin:digits (its ten digit prompts).
    # A flag of its own rather than reusing `perplexity`: a job may want one measurement without the other.
    accuracy: bool = True
    num_samples: int = 64  # evaluation windows
    seq_len: int = 512


ALLOCATIONS = ("uniform", "ecoflap-zeroth", "ecoflap-first", "owl")
GRANULARITIES = ("block", "layer")


@dataclass(frozen=True)
class AllocationSpec:
    """How sparse each block (or layer) is; `uniform` gives every layer the job's sparsity."""

    name: str = "uniform"  # one of ALLOCATIONS
    granularity: str = "block"  # one sparsity per block, or per layer
    # ECoFLaP: no group is pruned beyond this; None means the target + 0.1 (capped below 1).
    max_sparsity: float | None = None
    num_samples: int = 8  # calibration samples the scores are estimated on (the first ones)
    seq_len: int | None = None  # tokens per scoring sample; None: the calibration's
    eps: float = 1e-3  # ecoflap-zeroth: the perturbation's size
    outlier_multiple: float = 5.0  # owl: M, a weight is an outlier above M times its group's mean score
    spread: float = 0.08  # owl: lambda, sparsities lie in [target - lambda, target + lambda]


RESTORE_METHODS = ("sparse-lora", "lora")


@dataclass(frozen=True)
class RestoreSpec:
    """LoRA fine-tuning after pruning. "sparse-lora" trains and merges (W + s*B*A) masked by the pruned mask, so
    the merged model keeps exactly the pruned zeros; "lora" is plain LoRA, for comparison (it fills them in)."""

    method: str = "sparse-lora"  # one of RESTORE_METHODS
    steps: int = 200
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    lr: float = 1e-4
    distill: float = 0.1  # lambda: loss = (1 - lambda) * task loss + lambda * KL(dense teacher || student)
    batch_size: int = 4
    warmup_steps: float = 10  # linear warm-up: a number of steps, or a fraction of `steps` when in (0, 1)
    dataset: str | None = None  # None: the calibration dataset (as the job resolved it)
    targets: tuple[str, ...] | None = None  # layer-name suffixes ("q_proj", "mlp.fc1"); None: every pruned layer


@dataclass(frozen=True)
class PruneSpec:
    model_dir: Path  # HF layout (config.json + *.safetensors + tokenizer) or a folder with exactly one .gguf
    method: str  # "magnitude" | "wanda" | "sparsegpt"
    sparsity: float  # in (0, 1)
    pattern: str = "unstructured"
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    device: str = "cpu"  # "cpu" | "cuda" | "auto"
    # Per-tower sparsity ({"vision": 0.5, "language": 0.7}); only the named towers are pruned. None: `sparsity`
    # for every tower of DEFAULT_TOWERS the model has (vision and language; the Q-Former only when named).
    targets: dict[str, float] | None = None
    # Keep the model on the CPU and move one block at a time to `device` (models larger than the device).
    offload: bool = False
    allocation: AllocationSpec = field(default_factory=AllocationSpec)
    # A sweep: these sparsities from one calibration and scoring pass, one pruned model each (`sparsity` is
    # then ignored; `targets` must be None). Empty for an ordinary job.
    sweep: tuple[float, ...] = ()
    # Fine-tuning after pruning (every sparsity of a sweep is restored); None: the pruned model is saved as is.
    restore: RestoreSpec | None = None


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
