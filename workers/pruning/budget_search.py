"""Quality-budget jobs: the highest sparsity whose pruned model stays within a quality bound.

A budget job names a bound instead of a sparsity: the pruned model's perplexity at most `max_perplexity_ratio`
times the dense model's, or (CLIP-style models) its zero-shot accuracy at most `max_accuracy_drop` below the dense
model's, both measured on the held-out evaluation data. The service searches the grid min_sparsity,
min_sparsity + step, ..., max_sparsity (max_sparsity itself always included) for the highest sparsity within it.

The search assumes that quality only worsens as sparsity grows (monotonicity): then the sparsities within the
bound are a prefix of the grid, and bisection finds its last one with at most ceil(log2(n + 1)) probes of an
n-point grid (81 points, 0.1 to 0.9 by 0.01: 7 probes). Where quality is not monotone the answer is still a
probed sparsity within the bound whose next grid point was probed outside it (unless it is max_sparsity): a
local edge, which `probes` shows. Nothing within the bound (min_sparsity itself is outside) fails the job with
`budget_unreachable`, naming the bound and the best probe: a budget is a promise the service will not quietly break.

This module is the search and its record, free of models; the pipeline supplies the probe (prune from the dense
weights, measure) and runs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prunekit.vocabulary import BUDGET_UNREACHABLE
from workers.pruning.spec import BudgetSpec, JobError

# Two grid points never come closer than the smallest step the API takes (0.001); six places name them exactly.
_PLACES = 6
# A ratio or drop equal to the bound is within it, even where its last bit was lost to rounding.
_SLACK = 1e-9


@dataclass(frozen=True)
class Bound:
    """What a budget job holds the pruned model to: its metric's value against the dense model's."""

    metric: str  # "perplexity" (lower is better) or "accuracy" (higher is better)
    limit: float  # the largest ratio (perplexity) or drop (accuracy) allowed
    dense: float  # the dense model's value, measured once

    @property
    def measure(self) -> str:
        """The name of the quantity compared with the limit: "ratio" or "drop"."""
        return "ratio" if self.metric == "perplexity" else "drop"

    @property
    def option(self) -> str:
        return "max_perplexity_ratio" if self.metric == "perplexity" else "max_accuracy_drop"

    def describe(self) -> str:
        if self.metric == "perplexity":
            return f"perplexity at most {self.limit:g}x the dense model's ({self.dense:g})"
        return f"zero-shot accuracy at most {self.limit:g} below the dense model's ({self.dense:g})"


@dataclass(frozen=True)
class Probe:
    """One sparsity tried: the pruned model's value of the metric, its ratio or drop, whether within the bound."""

    sparsity: float
    value: float | None
    measure: float | None  # ratio (perplexity) or drop (accuracy); None when the value is not measurable
    within: bool

    def record(self, bound: Bound) -> dict[str, Any]:
        return {"sparsity": self.sparsity, bound.metric: self.value, bound.measure: self.measure,
                "within": self.within}


def judge(bound: Bound, sparsity: float, value: float | None) -> Probe:
    """The probe at `sparsity` whose pruned model measured `value`; nothing measurable (a perplexity that
    overflowed) is outside the bound."""
    if value is None or not math.isfinite(value):
        return Probe(sparsity, None, None, False)
    measure = value / bound.dense if bound.metric == "perplexity" else bound.dense - value
    return Probe(sparsity, value, round(measure, _PLACES), measure <= bound.limit + _SLACK)


def bound_of(spec: BudgetSpec, dense: dict[str, dict[str, float | None]]) -> Bound:
    """The job's bound against the dense model's measured quality ({"perplexity": {"dense": 12.3}, ...}).

    The metric must be one this job measured on this model: perplexity for language models (and the language
    model of LLaVA and BLIP-2), zero-shot accuracy for CLIP-style models."""
    metric = "perplexity" if spec.max_perplexity_ratio is not None else "accuracy"
    limit = spec.max_perplexity_ratio if metric == "perplexity" else spec.max_accuracy_drop
    assert limit is not None
    value = dense.get(metric, {}).get("dense")
    if value is None or not math.isfinite(value) or (metric == "perplexity" and value <= 0):
        option = f"budget.{'max_perplexity_ratio' if metric == 'perplexity' else 'max_accuracy_drop'}"
        if metric in dense:
            raise JobError("invalid_spec", f"{option}: the dense model's {metric} is not measurable, so no pruned "
                                           "model can be compared with it.")
        what = ("perplexity, which language models have (evaluation.perplexity on)" if metric == "perplexity" else
                "zero-shot accuracy, which only CLIP-style models have (evaluation.accuracy on)")
        raise JobError("invalid_spec", f"{option} needs the {what}; this job did not measure it on this model. "
                                       "Use max_perplexity_ratio for language models and max_accuracy_drop for "
                                       "CLIP-style models.")
    return Bound(metric, float(limit), float(value))


def grid(low: float, high: float, step: float) -> list[float]:
    """low, low + step, ... below high, then high: every sparsity the search may choose, rounded to 6 places."""
    if not (0.0 < low <= high < 1.0 and step > 0):
        raise JobError("invalid_spec", f"budget: need 0 < min_sparsity <= max_sparsity < 1 and step > 0; got "
                                       f"{low}, {high}, {step}.")
    points = []
    index = 0
    while (point := round(low + index * step, _PLACES)) < high - _SLACK:
        points.append(point)
        index += 1
    points.append(round(high, _PLACES))
    return points


def max_probes(num_points: int) -> int:
    """The most probes bisection makes on a grid of num_points: ceil(log2(num_points + 1))."""
    return max(1, math.ceil(math.log2(num_points + 1)))


@dataclass
class Outcome:
    bound: Bound
    points: list[float]
    probes: list[Probe]  # in the order they were made
    chosen: Probe | None  # None: not even the lowest sparsity is within the bound

    def record(self, spec: BudgetSpec) -> dict[str, Any]:
        """metrics.budget: the bound, the range searched, the chosen sparsity and every probe (lowest first)."""
        return {"metric": self.bound.metric, "bound": {self.bound.option: self.bound.limit},
                "dense": self.bound.dense,
                "range": {"min_sparsity": spec.min_sparsity, "max_sparsity": spec.max_sparsity, "step": spec.step,
                          "num_points": len(self.points)},
                "chosen_sparsity": self.chosen.sparsity if self.chosen is not None else None,
                "chosen": self.chosen.record(self.bound) if self.chosen is not None else None,
                "num_probes": len(self.probes),
                "probes": [probe.record(self.bound) for probe in sorted(self.probes, key=lambda p: p.sparsity)],
                "search": "bisection over the grid, assuming quality worsens as sparsity grows"}

    def unreachable(self) -> JobError:
        # Lower is better for both a ratio and a drop.
        best = min(self.probes, key=lambda p: math.inf if p.measure is None else p.measure)
        return JobError(BUDGET_UNREACHABLE,
                        f"No sparsity from {self.points[0]:g} to {self.points[-1]:g} keeps the "
                        f"{self.bound.describe()}: the best probe, at sparsity {best.sparsity:g}, has "
                        f"{_measured(self.bound, best)}. Lower budget.min_sparsity or loosen "
                        f"budget.{self.bound.option}.")


def search(points: Sequence[float], probe: Callable[[float], Probe],
           on_probe: Callable[[Probe, int], None] | None = None) -> tuple[Probe | None, list[Probe]]:
    """The highest point of the grid within the bound, by bisection; returns it (None when the lowest is outside)
    and every probe in the order made. `probe` prunes and measures at a sparsity; on_probe(probe, number) reports.

    Invariant: every point up to `inside` is taken to be within (index -1: none yet), every point from `outside` on
    to be outside (len(points): none yet). Each probe halves the points between them, so the loop ends after at
    most max_probes(len(points)) probes with `inside` the answer, and both it and the point after it probed."""
    inside, outside = -1, len(points)
    found: dict[int, Probe] = {}
    made: list[Probe] = []
    while outside - inside > 1:
        middle = (inside + outside) // 2
        result = probe(points[middle])
        found[middle] = result
        made.append(result)
        if on_probe is not None:
            on_probe(result, len(made))
        if result.within:
            inside = middle
        else:
            outside = middle
    return (found[inside] if inside >= 0 else None), made


def run_search(spec: BudgetSpec, bound: Bound, measure: Callable[[float], float | None],
               on_probe: Callable[[Probe, int], None] | None = None) -> Outcome:
    """The search of a budget job: `measure(sparsity)` prunes the dense model to it and returns the metric."""
    points = grid(spec.min_sparsity, spec.max_sparsity, spec.step)
    chosen, probes = search(points, lambda sparsity: judge(bound, sparsity, measure(sparsity)), on_probe)
    return Outcome(bound, points, probes, chosen)


def probe_message(bound: Bound, probe: Probe, number: int, most: int) -> str:
    """A progress line for one probe: what was measured and what it means for the search."""
    verdict = "within" if probe.within else "outside"
    limit = f"{bound.limit:g}x" if bound.metric == "perplexity" else f"a drop of {bound.limit:g}"
    return (f"Probe {number} of at most {most}: sparsity {probe.sparsity:g}: {_measured(bound, probe)}: {verdict} "
            f"the bound ({limit}).")


def _measured(bound: Bound, probe: Probe) -> str:
    if probe.value is None:
        return f"{bound.metric} not measurable"
    if bound.metric == "perplexity":
        return f"perplexity {probe.value:g}, {probe.measure:g}x the dense model's"
    return f"accuracy {probe.value:g}, {probe.measure:g} below the dense model's"
