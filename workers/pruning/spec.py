"""The engine's plain-data contract: what a job asks for, what it reports while running, what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("loading", "calibration", "evaluation_dense", "pruning", "evaluation_pruned", "saving")


@dataclass(frozen=True)
class CalibrationSpec:
    dataset: str = "builtin:wiki-en"  # or a path to a local .txt / .jsonl (field "text") file
    num_samples: int = 64
    seq_len: int = 512
    seed: int = 0


@dataclass(frozen=True)
class EvaluationSpec:
    perplexity: bool = True
    num_samples: int = 64  # evaluation windows
    seq_len: int = 512


@dataclass(frozen=True)
class PruneSpec:
    model_dir: Path  # HF layout (config.json + *.safetensors + tokenizer) or a folder with exactly one .gguf
    method: str  # "magnitude" | "wanda"
    sparsity: float  # in (0, 1)
    pattern: str = "unstructured"
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    device: str = "cpu"  # "cpu" | "cuda" | "auto"


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
