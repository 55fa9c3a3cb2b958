"""AlphaPruning's layer quality (Lu et al., NeurIPS 2024, arXiv:2410.10912): the heavy-tail exponent of a weight
matrix's empirical spectral density (ESD), from Heavy-Tailed Self-Regularization theory. Data-free.

The ESD is the eigenvalues of WᵀW (the squared singular values of W). Its tail is fitted with a power law
p(λ) ∝ λ^-α for λ ≥ λ_min by the Hill (maximum-likelihood) estimator

    α = 1 + n / Σ_{i: λ_i ≥ λ_min} ln(λ_i / λ_min),    n = #{i: λ_i ≥ λ_min},

and λ_min is the candidate (an eigenvalue) whose fit has the smallest Kolmogorov-Smirnov distance between the
tail's empirical CDF and the fitted one, 1 - (λ / λ_min)^(1-α). The paper's default metric, PL_Alpha_Hill with
"fix-fingers" xmin_peak, looks for λ_min only near the peak of the ESD: the most populated of 100 equal bins of
log10 λ, its left edge p, candidates in [0.95 p, 1.5 p]. A lower α is a heavier tail: a better-trained layer,
which AlphaPruning prunes less.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from workers.pruning.models import Tower, block_linears, weight_matrix
from workers.pruning.spec import JobCancelled

PEAK_BINS = 100  # the histogram of log10 eigenvalues whose fullest bin places the search for λ_min
PEAK_WINDOW = (0.95, 1.5)  # candidates λ_min in [0.95 p, 1.5 p], p the fullest bin's left edge


def _never() -> bool:
    return False


def _ignore(_done: int, _total: int) -> None:
    return None


def esd(weight: torch.Tensor) -> torch.Tensor:
    """The eigenvalues of WᵀW, ascending, in float64 (from float32 singular values, as the reference)."""
    singular = torch.linalg.svdvals(weight.detach().to(torch.float32))
    return torch.sort(singular.double().pow(2)).values


def hill_alpha(eigenvalues: torch.Tensor, peak: bool = True) -> float:
    """PL_Alpha_Hill of an ESD (any order); NaN when fewer than two eigenvalues are positive.

    peak: look for λ_min near the ESD's peak only (the paper's default); otherwise among all eigenvalues but the
    largest. When no eigenvalue falls in the peak's window, every candidate is tried.
    """
    values = torch.sort(eigenvalues.detach().double().flatten()).values
    values = values[values > 0]  # log 0: a zero eigenvalue (a rank-deficient matrix) has no place in a tail
    count = values.numel()
    if count < 2:
        return math.nan
    logs = values.log()
    candidates = list(range(count - 1))  # the largest alone is no tail
    if peak:
        log10 = values.log10()
        low, high = float(log10[0]), float(log10[-1])
        if high > low:
            edges = torch.linspace(low, high, PEAK_BINS + 1, dtype=torch.float64)
            fullest = int(torch.argmax(torch.histc(log10, PEAK_BINS, min=low, max=high)))
            top = 10 ** float(edges[fullest])
            window = [i for i in candidates if PEAK_WINDOW[0] * top <= float(values[i]) <= PEAK_WINDOW[1] * top]
            candidates = window or candidates
    # Suffix sums of ln λ: the Hill sum for every candidate at once.
    suffix = torch.flip(torch.cumsum(torch.flip(logs, [0]), 0), [0])
    best_alpha, best_distance = math.nan, math.inf
    for i in candidates:
        n = count - i
        denominator = float(suffix[i]) - n * float(logs[i])
        if denominator <= 0:  # every tail value equals λ_min: no slope to fit
            continue
        alpha = 1 + n / denominator
        empirical = torch.arange(n, dtype=torch.float64) / n
        fitted = 1 - (values[i:] / values[i]).pow(1 - alpha)
        distance = float((fitted - empirical).abs().max())
        if distance < best_distance:  # ties: the lower λ_min, the longer tail
            best_alpha, best_distance = alpha, distance
    return best_alpha


def layer_alphas(towers: Sequence[Tower], peak: bool = True, should_cancel: Callable[[], bool] = _never,
                 on_layer: Callable[[int, int], None] = _ignore) -> dict[str, float]:
    """PL_Alpha_Hill of every prunable layer of the towers, by full name; NaN where it is undefined."""
    layers = {f"{tower.prefix}.{index}.{name}": layer for tower in towers
              for index, block in enumerate(tower.blocks) for name, layer in block_linears(block).items()}
    alphas: dict[str, float] = {}
    with torch.inference_mode():
        for name, layer in layers.items():
            if should_cancel():
                raise JobCancelled("cancelled while scoring")
            alphas[name] = hill_alpha(esd(weight_matrix(layer)), peak)
            on_layer(len(alphas), len(layers))
    return alphas
