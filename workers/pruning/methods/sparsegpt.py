"""SparseGPT (Frantar & Alistarh, 2023, arXiv:2301.00774): prune column by column and let the kept weights
absorb each pruned weight's error through the inverse Hessian of the layer-wise reconstruction loss.

Written from the paper's Algorithm 1: H = 2/n · Σ x xᵀ, the upper Cholesky factor U of H⁻¹ (so that row j of
U, divided by U_jj, is the OBS update for column j once columns < j are fixed), column blocks whose errors
reach later blocks lazily in one matrix product, and masks chosen block by block with the score w²/U_jj².
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from workers.pruning.patterns import nm_mask, parse_pattern, row_prune_counts
from workers.pruning.spec import JobError

BLOCK_SIZE = 128
DAMPENING = 0.01  # fraction of the mean diagonal of H added to it, as in the paper
DAMPENING_RETRIES = 4  # each retry multiplies the dampening by 10: up to 10x the mean diagonal
# H's upper triangle is gathered in this many bands of columns (measured on one CPU thread, 4096 tokens: 8 bands
# cost 0.58-0.63x one whole x xᵀ at 576 and 1536 features); narrower bands than 64 lose more to overhead.
HESSIAN_BANDS = 8
HESSIAN_BAND_MIN = 64


class Hessian:
    """H = 2/n · Σ x xᵀ over every calibration token seen so far, as a running mean.

    A running mean rather than a sum keeps the entries at the scale of one token's x xᵀ, and fp32 keeps the
    low bits that bf16 would lose over tens of thousands of tokens. H is symmetric, so only its upper block rows
    are accumulated (H[a:b, a:] per band of columns): 0.6x the multiply-adds of the whole x xᵀ, the largest cost
    of gathering SparseGPT's statistics; `matrix` mirrors them into the whole of H.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self._upper = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        flat = inputs.detach().reshape(-1, inputs.shape[-1]).to(self._upper.device, torch.float32)
        if not flat.shape[0]:
            return
        total = self.tokens + flat.shape[0]
        # beta rescales the mean so far to the new count; alpha is 2/n of the new tokens' sum.
        beta, alpha = self.tokens / total, 2 / total
        cols = flat.shape[1]
        band = max(HESSIAN_BAND_MIN, -(-cols // HESSIAN_BANDS))
        for start in range(0, cols, band):
            self._upper[start:start + band, start:].addmm_(flat[:, start:start + band].T, flat[:, start:],
                                                           beta=beta, alpha=alpha)
        self.tokens = total

    @property
    def matrix(self) -> torch.Tensor:
        """The whole H (a new tensor): the upper triangle as accumulated, mirrored below the diagonal."""
        upper = torch.triu(self._upper)
        return upper + torch.triu(upper, 1).T


def prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: str = "unstructured",
          block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """The pruned and updated weight, in the weight's dtype.

    Unstructured: the layer ends with exactly round(sparsity · rows · in_features) zeros, every row with
    floor(sparsity · in_features) or one more (patterns.row_prune_counts, on the scores before any update),
    each block taking its share of every row's count. N:M: each group of m columns loses its m - n lowest
    scores, scored when the group is reached, so that earlier groups' updates count.
    """
    return prune_stacked([weight], hessian, [sparsity], pattern, block_size)[0]


def prune_stacked(weights: Sequence[torch.Tensor], hessian: torch.Tensor, sparsities: Sequence[float],
                  pattern: str = "unstructured", block_size: int = BLOCK_SIZE) -> list[torch.Tensor]:
    """Layers that read the same input (q, k, v; gate, up) pruned as one matrix [W_1; W_2; ...] with one H⁻¹.

    SparseGPT treats rows independently once H is fixed (the mask of a row depends on its own scores, the
    update of a row on its own errors), so this is pruning each layer alone with the same H, bit for bit:
    every layer keeps its own sparsity and its own row counts, and the one matrix product is still done per
    layer so that its shapes, and so its rounding, are the one-by-one ones. What is shared is the work that
    does not depend on the rows: H (gathered once, sequential.gather_stats), H⁻¹'s factor, and the per-column
    loop's small operations, once over all rows instead of once per layer.
    """
    if len(weights) != len(sparsities) or not weights:
        raise ValueError("need one sparsity per weight, and at least one weight")
    cols = weights[0].shape[1]
    if any(w.shape[1] != cols for w in weights):
        raise ValueError("stacked layers must have the same in_features")
    nm = parse_pattern(pattern)
    if nm is not None and cols % nm[1]:
        raise JobError("unsupported_pattern",
                       f"Pattern {pattern} needs in_features divisible by {nm[1]}; a layer has {cols}.")
    if nm is not None:
        block_size = max(nm[1], block_size // nm[1] * nm[1])  # groups must never straddle two blocks

    bounds = [0]
    for weight in weights:
        bounds.append(bounds[-1] + weight.shape[0])
    segments = list(itertools.pairwise(bounds))
    w = torch.cat([weight.detach().to(torch.float32) for weight in weights])
    h = hessian.detach().to(w.device, torch.float32).clone()
    # An input that never fired carries no information: its weights cannot matter on this data, and a unit
    # diagonal keeps H invertible without touching the other columns.
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    u = _inverse_cholesky(h)

    rows = w.shape[0]
    keep = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    if nm is None:
        # Each layer's own rows: its count and which rows take the one extra zero, from the scores before any
        # update (as if the whole row were one block).
        initial = w.pow(2) / torch.diagonal(u).pow(2).unsqueeze(0)
        quota = torch.cat([row_prune_counts(initial[a:b], sparsity)
                           for (a, b), sparsity in zip(segments, sparsities, strict=True)])
        ratio = torch.cat([torch.full((b - a,), sparsity, dtype=torch.float64, device=w.device)
                           for (a, b), sparsity in zip(segments, sparsities, strict=True)])
        pruned = torch.zeros(rows, dtype=torch.int64, device=w.device)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        width = end - start
        block = w[:, start:end].clone()
        u_block = u[start:end, start:end]
        diag = torch.diagonal(u_block)
        block_keep = keep[:, start:end]
        if nm is None:
            # round() spreads a row's count evenly over the blocks; the last block lands exactly on it, and no
            # row is left more to prune than the columns after this block can take.
            target = torch.minimum(torch.floor(ratio * end + 0.5).to(torch.int64), quota)
            target = torch.maximum(target, quota - (cols - end))
            count = (target - pruned).clamp(0, width)
            _prune_lowest(block_keep, block.pow(2) / diag.pow(2).unsqueeze(0), count)
            pruned += count
        # The loop runs once per column, so each step is a few in-place kernels on contiguous rows: the block is
        # held transposed (column j is row j), a pruned weight's error is its value times 1/U_jj (0 when kept),
        # and the rank-one update goes through one scratch buffer.
        columns = block.T.contiguous()
        # N:M masks are chosen group by group inside the loop: their rows of `drop` are filled as they are.
        drop = (~block_keep).T.to(torch.float32) / diag.unsqueeze(1)
        errors = torch.empty_like(columns)
        scratch = torch.empty_like(columns)
        for j in range(width):
            if nm is not None and j % nm[1] == 0:
                group = slice(j, j + nm[1])
                block_keep[:, group] = nm_mask(columns[group].T.pow(2) / diag[group].pow(2).unsqueeze(0), *nm)
                drop[group] = (~block_keep[:, group]).T.to(torch.float32) / diag[group].unsqueeze(1)
            torch.mul(columns[j], drop[j], out=errors[j])
            # OBS: column j lands on its kept value (w or 0) and the later columns of the block compensate.
            update = scratch[: width - j]
            torch.mul(u_block[j, j:].unsqueeze(1), errors[j].unsqueeze(0), out=update)
            columns[j:].sub_(update)
        w[:, start:end] = columns.T.masked_fill(~block_keep, 0)
        if end < cols:
            for a, b in segments:  # per layer: a matrix product's rounding may depend on its shape
                w[a:b, end:].sub_(errors[:, a:b].T @ u[start:end, end:])
    w = w.masked_fill(~keep, 0)
    return [w[a:b].to(weight.dtype) for (a, b), weight in zip(segments, weights, strict=True)]


def _prune_lowest(keep: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor) -> None:
    """Clears, in every row r of keep, its counts[r] lowest scores; ties go to the lower index (stable sort)."""
    if int(counts.max()):
        order = torch.sort(scores, dim=1, stable=True).indices
        ranks = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0)
        keep.scatter_(1, order, keep.gather(1, order) & (ranks >= counts.unsqueeze(1)))


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
