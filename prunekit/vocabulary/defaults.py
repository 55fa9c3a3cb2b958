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
    # None: chosen by scoring_defaults() below, from the allocation, its granularity and perturbation.
    num_samples: int | None = None
    seq_len: int | None = None  # None: as num_samples; where that leaves it None, the calibration's
    eps: float = 1e-3
    outlier_multiple: float = 5.0
    spread: float = 0.08
    # ecoflap-zeroth's directions, None: block at granularity block, tensor at granularity layer (which has no
    # blocks to share a direction); AlphaPruning's epsilon (its code's default, --epsilon 0.3, and its LLaMA-2-7B
    # Wanda script's); DLP's alpha (its code's default and every script's, 0.15).
    perturbation: str | None = None
    epsilon: float = 0.3
    alpha: float = 0.15


# Scoring windows where a request names none. ECoFLaP zeroth order with one direction per block needs many
# directions more than long windows: on SmolLM2 at Wanda 0.7 (bench/README.md, "Zeroth-order scoring per matrix or
# per block"), 16 windows of 32 tokens scored within 5% of one direction per matrix (its 3-seed mean, 4 x 128) at
# 1.0x one dense forward over the calibration set against 4.4x; 4 x 128 per block was as noisy as no scores at all.
SCORING_SAMPLES = 8
BLOCK_PERTURBATION_SAMPLES = 16
BLOCK_PERTURBATION_SEQ_LEN = 32


def scoring_defaults(allocation: str, granularity: str, perturbation: str | None, num_samples: int | None,
                     seq_len: int | None) -> tuple[str, int, int | None]:
    """(perturbation, num_samples, seq_len) with what a request left out filled in; seq_len None stays the
    calibration's. What a request names is kept as it is (the API refuses block at granularity layer)."""
    chosen = perturbation or ("block" if granularity == "block" else "tensor")
    by_block = allocation == "ecoflap-zeroth" and chosen == "block"
    if num_samples is None:
        num_samples = BLOCK_PERTURBATION_SAMPLES if by_block else SCORING_SAMPLES
    if seq_len is None and by_block:
        seq_len = BLOCK_PERTURBATION_SEQ_LEN
    return chosen, num_samples, seq_len


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
