"""Magnitude pruning: a weight matters as much as its absolute value."""

from __future__ import annotations

import torch

from workers.pruning.patterns import select_mask


def scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float()


def mask(weight: torch.Tensor, sparsity: float, pattern: str = "unstructured") -> torch.Tensor:
    return select_mask(scores(weight), sparsity, pattern)
