"""Wanda (Sun et al., 2023, arXiv:2306.11695): score |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

import torch

from workers.pruning.patterns import select_mask


class InputNorms:
    """Running sum over calibration tokens of x_j^2 for every input feature j of one Linear.

    Kept in fp32 whatever the activation dtype: bf16 sums over ~30k tokens would lose the low bits.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum_sq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        flat = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        self.sum_sq += flat.pow(2).sum(dim=0)
        self.tokens += flat.shape[0]

    def norms(self) -> torch.Tensor:
        return self.sum_sq.sqrt()


def scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float() * input_norms.to(weight.device, torch.float32).unsqueeze(0)


def mask(weight: torch.Tensor, input_norms: torch.Tensor, sparsity: float,
         pattern: str = "unstructured") -> torch.Tensor:
    return select_mask(scores(weight, input_norms), sparsity, pattern)
