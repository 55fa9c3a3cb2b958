"""Which weights to keep, given a score matrix: unstructured (per output row) and N:M selection.

Every function returns a boolean mask shaped like the scores, True = keep. Ties are broken by position
(the lower input index is pruned first) through a stable sort, so masks are reproducible across runs.

Unstructured counts are exact per layer: a rows x cols layer at ratio r ends with round(r * rows * cols) zeros
(layer_prune_count), every row with floor(r * cols) or one more (row_prune_counts). Flooring every row alone
would lose up to one zero per row, which adds up: a tiny Llama at 0.6 came out at 0.5943.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# The rule of what a pattern is (and the sparsity an N:M one fixes) is the vocabulary's: the API checks requests
# with the same one. Re-exported: the engine's modules and tests import it from here.
from prunekit.vocabulary import UNSTRUCTURED, parse_pattern

__all__ = ["UNSTRUCTURED", "layer_prune_count", "nm_mask", "parse_pattern", "prune_count", "row_prune_counts",
           "select_mask", "unstructured_mask"]


def prune_count(sparsity: float, width: int) -> int:
    """floor(sparsity * width), robust to float error (0.29 * 100 is 28.999999999999996 in binary)."""
    return min(width, math.floor(sparsity * width + 1e-9))


def layer_prune_count(sparsity: float, rows: int, cols: int) -> int:
    """The zeros a rows x cols layer ends with: the integer nearest to sparsity * rows * cols (halves up)."""
    return min(rows * cols, math.floor(sparsity * rows * cols + 0.5))


def row_prune_counts(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """How many entries each row loses: floor(sparsity * cols) everywhere, and one more in the rows that make
    the layer's total layer_prune_count (int64, one per row).

    The extra zeros go to the rows whose next candidate (their (floor + 1)-th lowest score) is lowest over the
    layer, ties to the lower row: the cheapest zeros to add. Wanda's score |W_ij| * ||X_j|| is the norm of the
    change that pruning W_ij makes to output i, magnitude's |W_ij| and SparseGPT's w^2 / [H^-1]_jj likewise
    compare across rows of one layer, so this adds the least error of any choice (the first k rows would
    add an arbitrary one).
    """
    # Only each row's (floor + 1)-th lowest score matters: a selection, not a sort of the whole row.
    return _counts(scores.shape, sparsity, lambda base: torch.kthvalue(scores, base + 1, dim=1).values,
                   scores.device)


def _counts(shape: torch.Size, sparsity: float, candidates: Callable[[int], torch.Tensor],
            device: torch.device) -> torch.Tensor:
    """row_prune_counts, given every row's (base + 1)-th lowest score as candidates(base)."""
    rows, width = shape
    base, extra = divmod(layer_prune_count(sparsity, rows, width), rows)
    counts = torch.full((rows,), base, dtype=torch.int64, device=device)
    if extra:
        counts[torch.sort(candidates(base), stable=True).indices[:extra]] += 1
    return counts


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """In every row, its row_prune_counts lowest scores are pruned: floor(sparsity * in_features) or one more,
    round(sparsity * rows * in_features) over the layer."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    rows, width = scores.shape
    mask = torch.ones(rows, width, dtype=torch.bool, device=scores.device)
    if layer_prune_count(sparsity, rows, width):
        ascending, order = torch.sort(scores, dim=1, stable=True)
        counts = _counts(scores.shape, sparsity, lambda base: ascending[:, base], scores.device)
        ranks = torch.arange(width, device=scores.device).unsqueeze(0)
        mask.scatter_(1, order, ranks >= counts.unsqueeze(1))
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """"N:M": in every row, each group of m consecutive inputs keeps its n highest scores (m - n zeros)."""
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < n < m, got {n}:{m}")
    rows, width = scores.shape
    if width % m:
        raise ValueError(f"{n}:{m} needs in_features divisible by {m}, got {width}")
    groups = scores.reshape(rows, width // m, m)
    lowest = torch.sort(groups, dim=2, stable=True).indices[:, :, : m - n]
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, lowest, False)
    return mask.reshape(rows, width)


def select_mask(scores: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    """The one entry point methods call; an N:M pattern fixes the sparsity itself (1 - n/m)."""
    nm = parse_pattern(pattern)
    return unstructured_mask(scores, sparsity) if nm is None else nm_mask(scores, *nm)
