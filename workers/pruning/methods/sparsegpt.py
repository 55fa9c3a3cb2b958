"""SparseGPT (Frantar & Alistarh, 2023, arXiv:2301.00774): prune column by column and let the kept weights
absorb each pruned weight's error through the inverse Hessian of the layer-wise reconstruction loss.

Written from the paper's Algorithm 1: H = 2/n · Σ x xᵀ, the upper Cholesky factor U of H⁻¹ (so that row j of
U, divided by U_jj, is the OBS update for column j once columns < j are fixed), column blocks whose errors
reach later blocks lazily in one matrix product, and masks chosen block by block with the score w²/U_jj².
"""

from __future__ import annotations

import math

import torch

from workers.pruning.patterns import nm_mask, parse_pattern, prune_count
from workers.pruning.spec import JobError

BLOCK_SIZE = 128
DAMPENING = 0.01  # fraction of the mean diagonal of H added to it, as in the paper
DAMPENING_RETRIES = 4  # each retry multiplies the dampening by 10: up to 10x the mean diagonal


class Hessian:
    """H = 2/n · Σ x xᵀ over every calibration token seen so far, as a running mean.

    A running mean rather than a sum keeps the entries at the scale of one token's x xᵀ, and fp32 keeps the
    low bits that bf16 would lose over tens of thousands of tokens.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.matrix = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        flat = inputs.detach().reshape(-1, inputs.shape[-1]).to(self.matrix.device, torch.float32)
        if not flat.shape[0]:
            return
        self.matrix *= self.tokens / (self.tokens + flat.shape[0])
        self.tokens += flat.shape[0]
        flat = flat * math.sqrt(2 / self.tokens)
        self.matrix.addmm_(flat.T, flat)


def prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: str = "unstructured",
          block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """The pruned and updated weight, in the weight's dtype.

    Unstructured: every row ends with exactly floor(sparsity · in_features) zeros (as Wanda), each block
    taking its share of every row's count. N:M: each group of m columns loses its m - n lowest scores,
    scored when the group is reached, so that earlier groups' updates count.
    """
    rows, cols = weight.shape
    nm = parse_pattern(pattern)
    if nm is not None and cols % nm[1]:
        raise JobError("unsupported_pattern",
                       f"Pattern {pattern} needs in_features divisible by {nm[1]}; a layer has {cols}.")
    if nm is not None:
        block_size = max(nm[1], block_size // nm[1] * nm[1])  # groups must never straddle two blocks

    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(w.device, torch.float32).clone()
    # An input that never fired carries no information: its weights cannot matter on this data, and a unit
    # diagonal keeps H invertible without touching the other columns.
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    u = _inverse_cholesky(h)

    keep = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    total = prune_count(sparsity, cols)
    pruned = 0  # per row, identical for every row by construction
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[:, start:end].clone()
        u_block = u[start:end, start:end]
        diag = torch.diagonal(u_block)
        block_keep = keep[:, start:end]
        if nm is None:
            # round() spreads the count evenly over blocks; the last block lands exactly on the floor.
            target = total if end == cols else min(round(sparsity * end), total)
            count = max(0, min(target - pruned, end - start))
            _prune_lowest(block_keep, block.pow(2) / diag.pow(2).unsqueeze(0), count)
            pruned += count
        errors = torch.zeros_like(block)
        for j in range(end - start):
            if nm is not None and j % nm[1] == 0:
                group = slice(j, j + nm[1])
                block_keep[:, group] = nm_mask(block[:, group].pow(2) / diag[group].pow(2).unsqueeze(0), *nm)
            column = block[:, j]
            error = torch.where(block_keep[:, j], 0.0, column) / diag[j]
            # OBS: column j lands on its kept value (w or 0) and the later columns of the block compensate.
            block[:, j:] -= error.unsqueeze(1) * u_block[j, j:].unsqueeze(0)
            errors[:, j] = error
        w[:, start:end] = block.masked_fill(~block_keep, 0)
        w[:, end:] -= errors @ u[start:end, end:]
    return w.masked_fill(~keep, 0).to(weight.dtype)


def _prune_lowest(keep: torch.Tensor, scores: torch.Tensor, count: int) -> None:
    """Clears, in every row of keep, the count lowest scores; ties go to the lower index (stable sort)."""
    if count:
        lowest = torch.sort(scores, dim=1, stable=True).indices[:, :count]
        keep.scatter_(1, lowest, False)


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, with λ ten times larger after each failure.

    Fp32 sums of many x xᵀ can leave H slightly indefinite, or too ill-conditioned to invert; more dampening
    trades a little accuracy of the update for a factor that exists.
    """
    mean_diag = float(torch.diagonal(h).mean())
    damp = DAMPENING * (mean_diag if math.isfinite(mean_diag) and mean_diag > 0 else 1.0)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(DAMPENING_RETRIES):
        try:
            lower = torch.linalg.cholesky(h + damp * eye)
            u = torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            u = None
        if u is not None and bool(torch.isfinite(u).all()):
            return u
        damp *= 10
    raise JobError("numerical_error",
                   "SparseGPT could not factor a layer's Hessian even with strong dampening; the calibration "
                   "activations may contain NaN or infinity (try another dataset or a higher-precision dtype).")
