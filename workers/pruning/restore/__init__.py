"""Restoration after pruning: LoRA fine-tuning that keeps the model exactly sparse (SparseLoRA), or plain LoRA.

lora.py: the masked adapter and its merge; schedule.py: warm-up and cosine; losses.py: task loss + KL from the
dense teacher; batches.py: training batches from the engine's data code; train.py: the loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from prunekit.vocabulary import OFFLOAD_MEMORY, offload_mode
from workers.pruning.multimodal import AnyModel, adapt
from workers.pruning.restore.batches import check_fits, training_data
from workers.pruning.restore.lora import dense_copies
from workers.pruning.restore.train import train
from workers.pruning.spec import RESTORE_METHODS, CalibrationSpec, JobError, Progress, RestoreSpec

__all__ = ["check", "check_model", "dense_copies", "restore_pruned", "select_layers"]

# Training draws its batches and adapters from this offset of the calibration seed: other windows than the
# ones the model was pruned on.
SEED_OFFSET = 104_729


def check(spec: RestoreSpec, offload: bool | str) -> None:
    """What a job's restore options must satisfy (the API checks the same); JobError invalid_spec otherwise."""
    def refuse(message: str) -> None:
        raise JobError("invalid_spec", message)

    if spec.method not in RESTORE_METHODS:
        refuse(f"restore.method {spec.method!r} is not available; use one of {', '.join(RESTORE_METHODS)}.")
    if not 1 <= spec.steps <= 100_000 or not 1 <= spec.rank <= 256 or not 1 <= spec.batch_size <= 256:
        refuse("restore.steps must be 1..100000, restore.rank 1..256 and restore.batch_size 1..256.")
    if not (math.isfinite(spec.alpha) and spec.alpha > 0) or not 0 < spec.lr <= 1 or not 0 <= spec.distill <= 1:
        refuse("restore.alpha must be positive, restore.lr in (0, 1] and restore.distill in [0, 1].")
    warmup = spec.warmup_steps
    # More warm-up steps than steps is capped (schedule.warmup_count): the default must suit a short run.
    if not (0 < warmup < 1 or (warmup >= 0 and float(warmup).is_integer())):
        refuse(f"restore.warmup_steps must be a whole number of steps or a fraction in (0, 1); got {warmup}.")
    if offload_mode(offload) != OFFLOAD_MEMORY:
        refuse(f"restore cannot be combined with offload {offload_mode(offload)!r}: training needs the whole model "
               "on the device, which offloading and streaming are for models too large to hold.")


def check_model(model: AnyModel, tokenizer: Any, spec: RestoreSpec, calibration: CalibrationSpec,
                layer_names: Sequence[str]) -> None:
    """Whether the loaded model can be restored as asked (its family, the dataset, the batch size, the targets
    among the layers to prune): checked before pruning, so that a job that cannot be restored fails early."""
    check_fits(model, tokenizer, spec.dataset or calibration.dataset, spec.batch_size)
    select_layers(layer_names, spec.targets)


def select_layers(pruned: Sequence[str], targets: Sequence[str] | None) -> set[str]:
    """The pruned layers that get an adapter: all of them, or those whose name ends with one of `targets`
    (a whole name part: "proj" does not select "q_proj")."""
    if not pruned:
        raise JobError("invalid_spec", "The job pruned no layer, so there is nothing to restore.")
    if targets is None:
        return set(pruned)
    chosen = {name for name in pruned if any(name == t or name.endswith(f".{t}") for t in targets)}
    if not chosen:
        examples = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in pruned})[:8])
        raise JobError("invalid_spec", f"restore.targets {list(targets)} name none of the pruned layers; their "
                                       f"names end in e.g. {examples}.")
    return chosen


def restore_pruned(model: AnyModel, tokenizer: Any, layers: Mapping[str, nn.Module], spec: RestoreSpec,
                   calibration: CalibrationSpec, dense: Mapping[str, torch.Tensor] | None,
                   on_progress: Callable[[Progress], None], should_cancel: Callable[[], bool],
                   label: str = "") -> dict[str, Any]:
    """Fine-tunes the pruned `layers` (by full name) of a pruned model in place and merges the adapters.

    The data is spec.dataset, or the calibration dataset (as the job resolved it), in windows of the
    calibration's seq_len; `dense` is the teacher (the layers' weights before pruning). Returns the facts for
    metrics["restore"].
    """
    adapter = adapt(model)
    dataset = spec.dataset or calibration.dataset
    seed = calibration.seed + SEED_OFFSET
    data = training_data(adapter, tokenizer, dataset, spec.batch_size, calibration.seq_len, seed, spec.archive_limits)
    adapted = select_layers(list(layers), spec.targets)

    def step_done(step: int, loss: float) -> None:
        on_progress(Progress("restoring", step, spec.steps,
                             f"Restoration step {step} of {spec.steps}{label}: loss {loss:.4f}."))

    facts = train(adapter.model, layers, adapted, spec, data, seed, dense, step_done, should_cancel)
    return {**facts, "data": data.info}
