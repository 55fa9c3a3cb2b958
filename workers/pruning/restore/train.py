"""The restoration loop: adapters on the pruned layers, AdamW with warm-up and cosine decay, then the merge."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from workers.pruning.restore import lora
from workers.pruning.restore.batches import CONTRASTIVE, Batch, TrainingData
from workers.pruning.restore.losses import Loss, causal_lm_loss, contrastive_loss
from workers.pruning.restore.schedule import lr_factor, warmup_count
from workers.pruning.spec import JobCancelled, JobError, RestoreSpec

MAX_LOSS_POINTS = 50  # losses recorded (and progress events sent) per run, whatever the number of steps
GRAD_CLIP = 1.0  # LoRA's usual clipping: one bad batch cannot throw the adapters far


def _never() -> bool:
    return False


def train(model: nn.Module, layers: Mapping[str, nn.Module], adapted: set[str], spec: RestoreSpec,
          training: TrainingData, seed: int, dense: Mapping[str, torch.Tensor] | None = None,
          on_step: Callable[[int, float], None] | None = None,
          should_cancel: Callable[[], bool] = _never) -> dict[str, Any]:
    """Trains adapters on `adapted` (names in `layers`, the pruned layers) and merges them into the weights.

    `dense` holds the dense weights of the pruned layers: the teacher, needed when spec.distill > 0.
    on_step(step, mean loss since the last call) follows every loss_every-th step and the last one.
    Returns plain facts: losses, timings, parameter counts and whether the pruned zeros were kept.
    """
    if spec.distill > 0 and dense is None:
        raise ValueError("distillation needs the dense weights of the pruned layers")
    device = next(model.parameters()).device
    model.requires_grad_(False)  # only the adapters learn
    attached = lora.attach(layers, adapted, spec.rank, spec.alpha, spec.method == "sparse-lora", seed,
                           dense if spec.distill > 0 else None)
    merged = False
    try:
        parameters = [p for adapter in attached.values() for p in adapter.parameters()]
        # No weight decay: it would pull A towards zero for no reason (B starts there).
        optimizer = torch.optim.AdamW(parameters, lr=spec.lr, weight_decay=0.0)
        warmup = warmup_count(spec.warmup_steps, spec.steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, spec.steps, warmup))
        every = max(1, math.ceil(spec.steps / MAX_LOSS_POINTS))
        losses: list[float] = []
        window: list[float] = []
        first = last = math.nan
        last_parts: Loss | None = None
        start, cpu_start = time.perf_counter(), time.process_time()
        for step in range(spec.steps):
            if should_cancel():
                raise JobCancelled(f"cancelled before restoration step {step + 1}")
            batch = training.batch(step).to(device)
            loss = _step(training, batch, attached, spec.distill)
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            torch.nn.utils.clip_grad_norm_(parameters, GRAD_CLIP)
            optimizer.step()
            scheduler.step()
            value = float(loss.total.detach())
            if not math.isfinite(value):
                raise JobError("restore_diverged", f"The restoration loss became {value} at step {step + 1}; "
                                                   "try a lower restore.lr.")
            if step == 0:
                first = value
            last, last_parts = value, loss
            window.append(value)
            if len(window) == every or step + 1 == spec.steps:
                losses.append(sum(window) / len(window))
                window = []
                if on_step is not None:
                    on_step(step + 1, losses[-1])
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        preserved = lora.merge(layers, attached)
        merged = True
    finally:
        if not merged:
            lora.detach(layers, attached)
    assert last_parts is not None
    return {
        "method": spec.method, "steps": spec.steps, "rank": spec.rank, "alpha": spec.alpha, "lr": spec.lr,
        "distill": spec.distill, "batch_size": spec.batch_size, "warmup_steps": warmup,
        "loss_first": round(first, 6), "loss_last": round(last, 6),
        "loss_last_task": round(last_parts.task, 6), "loss_last_distill": round(last_parts.distill, 6),
        "loss_every": every, "losses": [round(value, 6) for value in losses],
        "seconds": round(seconds, 3),
        # CPU time of the whole process over the loop (every thread): what a fine-tune costs on a CPU.
        "cpu_seconds": round(cpu_seconds, 3),
        "num_adapted_layers": len(adapted),
        "trainable_parameters": sum(p.numel() for p in parameters),
        # Every merged layer has zeros exactly where pruning left them (and nowhere else).
        "mask_preserved": all(preserved.values()),
    }


def _step(training: TrainingData, batch: Batch, attached: Mapping[str, lora.LoRAWeight], distill: float) -> Loss:
    teacher = None
    if distill > 0:
        with torch.no_grad(), lora.teacher_mode(attached):
            teacher = _logits(training, batch)
    student = _logits(training, batch)
    if training.objective == CONTRASTIVE:
        return contrastive_loss(student, teacher, distill)
    assert batch.labels is not None
    return causal_lm_loss(student, teacher, batch.labels, distill)


def _logits(training: TrainingData, batch: Batch) -> torch.Tensor:
    """Next-token logits [batch, seq, vocab], or CLIP's image-to-text similarities [n, n]."""
    output = training.model(**batch.inputs)
    if training.objective == CONTRASTIVE:
        return output.logits_per_image
    logits = output.logits
    if batch.labels is not None and logits.shape[1] != batch.labels.shape[1]:
        raise RuntimeError(f"the model returned logits for {logits.shape[1]} positions, not the "
                           f"{batch.labels.shape[1]} of its input ids")
    return logits
