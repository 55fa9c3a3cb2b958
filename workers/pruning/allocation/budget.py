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


def alpha_spread(alphas: Sequence[float], sizes: Sequence[int], target: float, epsilon: float = 0.3,
                 max_sparsity: float = 0.99) -> list[float]:
    """AlphaPruning: sparsity proportional to (1 - epsilon) + 2 epsilon (alpha - min) / (max - min).

    The heavy-tail exponents are mapped linearly onto [1 - epsilon, 1 + epsilon] (the lowest alpha, the best
    trained group, at 1 - epsilon) and all multiplied by one factor so that the parameter-weighted mean is the
    target, as in the paper (so the sparsities span [(1 - eps) c, (1 + eps) c] with c near the target). A group
    the factor would take beyond max_sparsity is held there and the others share what is left, scaled alike.
    Equal exponents give every group the target.
    """
    _check(alphas, sizes, target)
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be in [0, 1); got {epsilon}")
    if not target <= max_sparsity <= 1.0:
        raise ValueError(f"max_sparsity must be in [target, 1] = [{target}, 1]; got {max_sparsity}")
    low, high = min(alphas), max(alphas)
    raw = ([1.0] * len(sizes) if high - low <= 0.0 else
           [1.0 - epsilon + 2.0 * epsilon * (a - low) / (high - low) for a in alphas])
    capped: set[int] = set()
    values = [0.0] * len(sizes)
    budget = target * sum(sizes)  # weights to prune
    while True:
        free = [g for g in range(len(sizes)) if g not in capped]
        left = budget - max_sparsity * sum(sizes[g] for g in capped)
        weight = sum(raw[g] * sizes[g] for g in free)
        if weight <= 0.0:  # everything capped (only within float error, as max_sparsity >= target)
            scale = 0.0
            break
        scale = left / weight
        over = [g for g in free if raw[g] * scale > max_sparsity]
        if not over:
            break
        capped.update(over)
    for g in range(len(sizes)):
        values[g] = max_sparsity if g in capped else raw[g] * scale
    return _exact(values, sizes, target)


def dlp_spread(unimportance: Sequence[float], sizes: Sequence[int], target: float, alpha: float = 0.15) -> list[float]:
    """DLP: a group's unimportance U (the median of its weights' |W| * ||X|| scores) becomes its relative
    importance I = 1 - U / sum(U); importances are mapped linearly onto [target - alpha, target + alpha], the most
    important group the least sparse, then shifted together so that the parameter-weighted mean is the target
    (the paper shifts by the plain mean: the same for blocks of equal size). That is OWL's spread, on I."""
    _check(unimportance, sizes, target)
    if any(u < 0 for u in unimportance):
        raise ValueError("unimportance is a median of absolute scores: it cannot be negative")
    total = sum(unimportance)
    importance = [1.0 - u / total for u in unimportance] if total > 0 else [1.0] * len(sizes)
    return owl_spread(importance, sizes, target, alpha)


def _exact(values: list[float], sizes: Sequence[int], target: float) -> list[float]:
    """The weighted mean to the last ulp: the largest group that stays in [0, 1] absorbs the float error."""
    error = target - weighted_mean(values, sizes)
    for g in sorted(range(len(sizes)), key=lambda g: -sizes[g]):
        adjusted = values[g] + error * sum(sizes) / sizes[g]
        if 0.0 <= adjusted <= 1.0:
            values[g] = adjusted
            break
    return values


def _sparsities(keep: Sequence[float], sizes: Sequence[int], target: float) -> list[float]:
    # Float sums leave the mean a few ulps off; one group absorbs that so it is the target.
    return _exact([1.0 - k / n for k, n in zip(keep, sizes, strict=True)], sizes, target)


def _check(scores: Sequence[float], sizes: Sequence[int], target: float) -> None:
    if len(scores) != len(sizes) or not sizes:
        raise ValueError("need one score per group and at least one group")
    if any(n <= 0 for n in sizes):
        raise ValueError("every group needs at least one weight")
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be in (0, 1); got {target}")
    if any(not math.isfinite(float(s)) for s in scores):
        raise ValueError("scores must be finite")
