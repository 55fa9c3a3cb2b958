"""LoRA on pruned layers as a parametrization of their weight (pure torch), and the merge.

A parametrization (torch.nn.utils.parametrize) recomputes `layer.weight` from the frozen pruned weight W on
every access, so an nn.Linear and transformers' Conv1D (GPT-2, weight stored [in, out]) are adapted alike,
without replacing modules or touching their forward:

    sparse-lora:  W_eff = where(M, W + s * B @ A, W)    M = (W != 0), s = alpha / rank
    lora:         W_eff = W + s * B @ A

M is read off W itself (the pruned weight never changes during training), so no mask is stored. `where`
passes gradient only where M holds, so A and B only ever receive masked gradients, and at pruned positions
W_eff is W's own value: the zeros are kept bit for bit, in training and after the merge. A is [rank, in]
and B [out, rank], both fp32 whatever the model's dtype; B starts at zero, so training starts from the
pruned model exactly.

The same parametrization serves the teacher: with `teacher` set, it returns the layer's dense weight (a copy
kept off the model, on the CPU), moved to the device only while that one layer runs. Pruned layers without an
adapter get a teacher-only parametrization, so the teacher is the whole dense model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize


class LoRAWeight(nn.Module):
    """What `layer.weight` becomes while adapted: W -> W_eff (or the dense weight, for the teacher)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, masked: bool, transposed: bool,
                 generator: torch.Generator | None = None, dense: torch.Tensor | None = None) -> None:
        super().__init__()
        out_features, in_features = weight.shape[::-1] if transposed else weight.shape
        self.masked, self.transposed = masked, transposed
        self.scale = alpha / rank if rank else 0.0
        self.teacher = False
        # A plain attribute, not a buffer: neither state_dict nor .to() may see or move the CPU copy.
        self.dense = dense
        self.A: nn.Parameter | None = None
        self.B: nn.Parameter | None = None
        if rank:
            # As nn.Linear and peft initialise A (kaiming_uniform with a = sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)).
            bound = 1.0 / math.sqrt(in_features)
            a = (torch.rand((rank, in_features), generator=generator) * 2 - 1) * bound
            self.A = nn.Parameter(a.to(weight.device))
            self.B = nn.Parameter(torch.zeros((out_features, rank), device=weight.device))

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(left, right) with left @ right = B @ A in the layer's own orientation."""
        assert self.A is not None and self.B is not None
        return (self.A.T, self.B.T) if self.transposed else (self.B, self.A)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.teacher:
            if self.dense is None:
                raise RuntimeError("this layer has no dense weight to act as the teacher")
            return self.dense.to(weight.device, non_blocking=True)
        if self.A is None:
            return weight
        left, right = self._factors()
        if self.masked:
            return _MaskedUpdate.apply(weight, left, right, self.scale)
        return torch.addmm(weight.float(), left, right, alpha=self.scale).to(weight.dtype)


class _MaskedUpdate(torch.autograd.Function):
    """where(W != 0, W + s * left @ right, W), in the fewest passes over a weight-sized tensor.

    Weight-sized elementwise work is a large share of an adapted step (a profile of SmolLM2 at one 512-token
    window a step: `where`, `mul`, `add` and `ne` over the weights took about 30% of its CPU time, the matmuls
    40%), because autograd kept every intermediate of where(M, W + s * (B @ A), W). Here the forward is one fused
    addmm and one `where`, the backward one masking; the mask is recomputed from W (which never changes) instead
    of being stored, so training needs no extra weight-sized memory.
    """

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor,  # type: ignore[override]
                scale: float) -> torch.Tensor:
        ctx.save_for_backward(weight, left, right)
        ctx.scale = scale
        full = weight.float()
        # where, not a multiply by the mask: the pruned entries keep W's own bits (a -0.0 stays -0.0).
        return torch.where(weight != 0, torch.addmm(full, left, right, alpha=scale), full).to(weight.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        weight, left, right = ctx.saved_tensors
        masked = grad.float() * (weight != 0)
        return None, torch.mm(masked, right.T).mul_(ctx.scale), torch.mm(left.T, masked).mul_(ctx.scale), None


def attach(layers: Mapping[str, nn.Module], adapted: set[str], rank: int, alpha: float, masked: bool,
           seed: int, dense: Mapping[str, torch.Tensor] | None = None) -> dict[str, LoRAWeight]:
    """Parametrizes the layers: an adapter on those in `adapted`, the teacher's dense weight on those in `dense`.

    A is drawn from one generator seeded with `seed`, layer by layer in name order, so that the same job draws
    the same adapters. Returns the parametrizations by layer name; layers with neither are left alone.
    """
    generator = torch.Generator().manual_seed(seed)
    attached: dict[str, LoRAWeight] = {}
    for name in sorted(layers):
        teacher_weight = dense.get(name) if dense is not None else None
        if name not in adapted and teacher_weight is None:
            continue
        layer = layers[name]
        lora = LoRAWeight(layer.weight, rank if name in adapted else 0, alpha, masked,
                          transposed=not isinstance(layer, nn.Linear), generator=generator, dense=teacher_weight)
        parametrize.register_parametrization(layer, "weight", lora)
        attached[name] = lora
    return attached


@contextlib.contextmanager
def teacher_mode(attached: Mapping[str, LoRAWeight]) -> Iterator[None]:
    """Inside: every parametrized layer computes with its dense weight (the dense model, for the teacher)."""
    for lora in attached.values():
        lora.teacher = True
    try:
        yield
    finally:
        for lora in attached.values():
            lora.teacher = False


def merge(layers: Mapping[str, nn.Module], attached: Mapping[str, LoRAWeight]) -> dict[str, bool]:
    """Writes W_eff into each layer's plain weight and removes the parametrizations.

    W_eff is computed by the very function training used, so the merged model computes what the adapted one
    did. Returns, per layer, whether its zeros are exactly the pruned ones (always so for sparse-lora).
    """
    preserved: dict[str, bool] = {}
    with torch.no_grad():
        for name, lora in attached.items():
            layer = layers[name]
            lora.teacher = False
            merged = layer.weight
            pruned = layer.parametrizations.weight.original
            preserved[name] = bool(torch.equal(merged == 0, pruned == 0))
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
            layer.weight.copy_(merged)
    return preserved


def detach(layers: Mapping[str, nn.Module], attached: Mapping[str, LoRAWeight]) -> None:
    """Removes whatever parametrizations are left, keeping the pruned weights (after a failure or a cancel)."""
    for name in attached:
        layer = layers[name]
        if parametrize.is_parametrized(layer, "weight"):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)


def dense_copies(layers: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The layers' weights as CPU copies (pinned where a GPU will fetch them back): the teacher, kept before
    pruning. CPU memory rather than a second model on the device; each copy visits the device in turn."""
    pin = torch.cuda.is_available() and any(layer.weight.is_cuda for layer in layers.values())
    copies = {}
    with torch.no_grad():
        for name, layer in layers.items():
            copy = layer.weight.detach().to("cpu", copy=True)
            copies[name] = copy.pin_memory() if pin else copy
    return copies
