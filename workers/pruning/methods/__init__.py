"""Pruning methods behind one shape: optional statistics gathered from a Linear's inputs, then a new weight.

A method returns the pruned weight rather than a mask so that methods which also update the kept
weights (SparseGPT) fit the same driver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from workers.pruning.methods import magnitude, sparsegpt, wanda
from workers.pruning.spec import JobError


class Stats(Protocol):
    def add(self, inputs: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class Method:
    name: str
    # None: the method needs no calibration activations, so the driver skips every forward pass.
    new_stats: Callable[[nn.Linear], Stats] | None
    # (weight, stats, sparsity, pattern) -> the pruned weight
    prune: Callable[[torch.Tensor, Stats | None, float, str], torch.Tensor]
    # Layers that read the same input share one stats object (sequential.gather_stats); a method whose pruning
    # has per-input work to share (SparseGPT's H⁻¹) prunes them together: (weights, their shared stats, their
    # sparsities, pattern) -> the pruned weights, each exactly what `prune` would give it. None: one by one.
    prune_group: Callable[[list[torch.Tensor], Stats | None, list[float], str], list[torch.Tensor]] | None = None


def _magnitude_prune(weight: torch.Tensor, _stats: Stats | None, sparsity: float,
                     pattern: str) -> torch.Tensor:
    return weight.masked_fill(~magnitude.mask(weight, sparsity, pattern), 0)


def _wanda_stats(layer: nn.Linear) -> wanda.InputNorms:
    return wanda.InputNorms(layer.in_features, layer.weight.device)


def _wanda_prune(weight: torch.Tensor, stats: Stats | None, sparsity: float, pattern: str) -> torch.Tensor:
    if not isinstance(stats, wanda.InputNorms) or stats.tokens == 0:
        raise RuntimeError("wanda needs input statistics from at least one calibration token")
    return weight.masked_fill(~wanda.mask(weight, stats.norms(), sparsity, pattern), 0)


def _sparsegpt_stats(layer: nn.Linear) -> sparsegpt.Hessian:
    return sparsegpt.Hessian(layer.in_features, layer.weight.device)


def _sparsegpt_prune(weight: torch.Tensor, stats: Stats | None, sparsity: float, pattern: str) -> torch.Tensor:
    if not isinstance(stats, sparsegpt.Hessian) or stats.tokens == 0:
        raise RuntimeError("sparsegpt needs input statistics from at least one calibration token")
    return sparsegpt.prune(weight, stats.matrix, sparsity, pattern)


def _sparsegpt_prune_group(weights: list[torch.Tensor], stats: Stats | None, sparsities: list[float],
                           pattern: str) -> list[torch.Tensor]:
    if not isinstance(stats, sparsegpt.Hessian) or stats.tokens == 0:
        raise RuntimeError("sparsegpt needs input statistics from at least one calibration token")
    return sparsegpt.prune_stacked(weights, stats.matrix, sparsities, pattern)


METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude", None, _magnitude_prune),
    "wanda": Method("wanda", _wanda_stats, _wanda_prune),
    "sparsegpt": Method("sparsegpt", _sparsegpt_stats, _sparsegpt_prune, _sparsegpt_prune_group),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        available = ", ".join(METHODS)
        raise JobError("unsupported_method",
                       f"Pruning method {name!r} is not available; available: {available}.") from None
