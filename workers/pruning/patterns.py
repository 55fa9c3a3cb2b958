"""Which weights to keep, given a score matrix: unstructured (per output row) and N:M selection.

Every function returns a boolean mask shaped like the scores, True = keep. Ties are broken by position
(the lower input index is pruned first) through a stable sort, so masks are reproducible across runs.
"""

from __future__ import annotations

import math

import torch

# The rule of what a pattern is (and the sparsity an N:M one fixes) is the vocabulary's: the API checks requests
# with the same one. Re-exported: the engine's modules and tests import it from here.
from prunekit.vocabulary import UNSTRUCTURED, parse_pattern

__all__ = ["UNSTRUCTURED", "nm_mask", "parse_pattern", "prune_count", "select_mask", "unstructured_mask"]


def prune_count(sparsity: float, width: int) -> int:
    """floor(sparsity * width), robust to float error (0.29 * 100 is 28.999999999999996 in binary)."""
    return min(width, math.floor(sparsity * width + 1e-9))


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """In every row, the floor(sparsity * in_features) lowest scores are pruned."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    rows, width = scores.shape
    k = prune_count(sparsity, width)
    mask = torch.ones(rows, width, dtype=torch.bool, device=scores.device)
    if k:
        lowest = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, lowest, False)
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
