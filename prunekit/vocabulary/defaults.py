"""Every default of a job request, written once: the API fills a request in with these and the engine's spec
dataclasses default to them, so a job sent with or without the API runs the same."""

from __future__ import annotations

from dataclasses import dataclass

from prunekit.vocabulary.names import UNIFORM, UNSTRUCTURED, WIKI_EN


@dataclass(frozen=True)
class CalibrationDefaults:
    # A CLIP model left at this dataset calibrates on builtin:digits; the job's report names the dataset used.
    dataset: str = WIKI_EN
    num_samples: int = 64
    seq_len: int = 512
    seed: int = 0


@dataclass(frozen=True)
class EvaluationDefaults:
    perplexity: bool = True
    accuracy: bool = True
    num_samples: int = 64
    seq_len: int = 512
    # multiple-choice tasks scored dense and pruned (builtin:wiki-next-sentence or ds_... task files),
    # and how many items of each: the built-in task draws this many, an uploaded file's first this many are used.
    tasks: tuple[str, ...] = ()
    task_num_samples: int = 100


@dataclass(frozen=True)
class AllocationDefaults:
    name: str = UNIFORM
    granularity: str = "block"
    max_sparsity: float | None = None  # None: the target + 0.1 (capped below 1)
    num_samples: int = 8
    seq_len: int | None = None  # None: the calibration's
    eps: float = 1e-3
    outlier_multiple: float = 5.0
    spread: float = 0.08
    # ecoflap-zeroth's directions (one per matrix, as before); AlphaPruning's epsilon (its code's default,
    # --epsilon 0.3, and its LLaMA-2-7B Wanda script's); DLP's alpha (its code's default and every script's, 0.15).
    perturbation: str = "tensor"
    epsilon: float = 0.3
    alpha: float = 0.15


@dataclass(frozen=True)
class RestoreDefaults:
    method: str = "sparse-lora"
    steps: int = 200
    rank: int = 8
    alpha: float = 16  # an int, as the API has always stored it in a job's request
    lr: float = 1e-4
    distill: float = 0.1
    batch_size: int = 4
    warmup_steps: int = 10


@dataclass(frozen=True)
class BudgetDefaults:
    # Quality-budget jobs (`budget`): the grid of sparsities searched, min_sparsity to max_sparsity by step.
    min_sparsity: float = 0.1
    max_sparsity: float = 0.9
    step: float = 0.01


CALIBRATION = CalibrationDefaults()
EVALUATION = EvaluationDefaults()
ALLOCATION = AllocationDefaults()
RESTORE = RestoreDefaults()
BUDGET = BudgetDefaults()
PATTERN = UNSTRUCTURED
OFFLOAD = False
# A worker's memory budget when WORKER_MEMORY_BUDGET_MB is not set: this share of the memory available when it
# starts. A model larger than the budget (as loaded for compute) is streamed from disk.
MEMORY_BUDGET_SHARE = 0.6
