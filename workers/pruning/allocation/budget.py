"""Turning per-group importance into per-group sparsity whose parameter-weighted mean is the target.

A group is a block or a single layer; N_g is its number of prunable weights. Everything here is pure
arithmetic on plain numbers, so it is tested on hand-made scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

_TOLERANCE = 1e-12


def weighted_mean(sparsities: Sequence[float], sizes: Sequence[int]) -> float:
    total = sum(sizes)
    return sum(s * n for s, n in zip(sparsities, sizes, strict=True)) / total


def water_fill(scores: Sequence[float], sizes: Sequence[int], target: float, max_sparsity: float) -> list[float]:
    """ECoFLaP's proportional water-filling of the keep budget.

    Every group first keeps ceil(N_g (1 - max_sparsity)) weights, so no group is pruned beyond max_sparsity.
    The rest of the budget N (1 - target) is shared in proportion to the scores; a group that would keep more
    than all its weights is capped at N_g and the excess is shared again among the others, until the budget
    is spent. Groups whose scores are all zero share what is left in proportion to their size (uniformly).
    """
    _check(scores, sizes, target)
    if not target <= max_sparsity < 1.0:
        raise ValueError(f"max_sparsity must be in [target, 1) = [{target}, 1); got {max_sparsity}")
    total = sum(sizes)
    keep = [float(math.ceil(n * (1.0 - max_sparsity) - 1e-9)) for n in sizes]
    remaining = total * (1.0 - target) - sum(keep)
    if remaining < -1e-6:
        # ceil() can overshoot by under one weight per group: only possible when max_sparsity == target
        raise ValueError(f"max_sparsity {max_sparsity} leaves no room for target {target} in groups this small")
    open_groups = [g for g, n in enumerate(sizes) if keep[g] < n]
    while remaining > _TOLERANCE * total and open_groups:
        weights = [max(float(scores[g]), 0.0) for g in open_groups]
        if sum(weights) <= 0.0:
            weights = [float(sizes[g]) for g in open_groups]
        share = sum(weights)
        capped = []
        spent = 0.0
        for g, weight in zip(open_groups, weights, strict=True):
            wanted = remaining * weight / share
            room = sizes[g] - keep[g]
            if wanted >= room:
                keep[g] = float(sizes[g])
                spent += room
                capped.append(g)
            else:
                keep[g] += wanted
                spent += wanted
        remaining -= spent
        if not capped:
            break  # everything fitted: the budget is spent
        open_groups = [g for g in open_groups if g not in capped]
    return _sparsities(keep, sizes, target)


def owl_spread(outlier_ratios: Sequence[float], sizes: Sequence[int], target: float,
               spread: float = 0.08) -> list[float]:
    """OWL: sparsity in [target - spread, target + spread], lower where the outlier ratio is higher.

    The ratios are mapped linearly onto the interval (the group with the most outliers at target - spread,
    the fewest at target + spread), then all shifted by one constant so that the parameter-weighted mean is
    the target exactly. Equal ratios give every group the target.
    """
    _check(outlier_ratios, sizes, target)
    if not 0.0 <= spread < min(target, 1.0 - target) + 1e-12:
        raise ValueError(f"spread (lambda) must be in [0, min(target, 1 - target)); got {spread}")
    low, high = min(outlier_ratios), max(outlier_ratios)
    if high - low <= 0.0:
        raw = [target] * len(sizes)
    else:
        raw = [target + spread - 2.0 * spread * (r - low) / (high - low) for r in outlier_ratios]
    shift = target - weighted_mean(raw, sizes)
    return [min(max(s + shift, 0.0), 1.0) for s in raw]


def _sparsities(keep: Sequence[float], sizes: Sequence[int], target: float) -> list[float]:
    values = [1.0 - k / n for k, n in zip(keep, sizes, strict=True)]
    # Float sums leave the mean a few ulps off; the last open group absorbs that so it is the target.
    error = target - weighted_mean(values, sizes)
    for g in sorted(range(len(sizes)), key=lambda g: -sizes[g]):
        adjusted = values[g] + error * sum(sizes) / sizes[g]
        if 0.0 <= adjusted <= 1.0:
            values[g] = adjusted
            break
    return values


def _check(scores: Sequence[float], sizes: Sequence[int], target: float) -> None:
    if len(scores) != len(sizes) or not sizes:
        raise ValueError("need one score per group and at least one group")
    if any(n <= 0 for n in sizes):
        raise ValueError("every group needs at least one weight")
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be in (0, 1); got {target}")
    if any(not math.isfinite(float(s)) for s in scores):
        raise ValueError("scores must be finite")
