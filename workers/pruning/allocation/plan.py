"""A job's allocation: scores (or outlier counts) per layer, grouped per block or layer, turned into sparsities.

Without per-tower targets, one joint allocation spans every pruned tower (ECoFLaP's setting for
vision-language models); with targets, each tower meets its own budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from workers.pruning.allocation import budget, scoring
from workers.pruning.models import Tower, block_linears, weight_matrix
from workers.pruning.sequential import ModelInputs
from workers.pruning.spec import AllocationSpec, JobError

MAX_SPARSITY_MARGIN = 0.1
MAX_SPARSITY_CAP = 0.99


class ScoreCache(Protocol):
    """Raw scores by key; get() answers None when absent (or unreadable: the job then scores again)."""

    def get(self, key: str) -> dict[str, Any] | None: ...
    def put(self, key: str, value: dict[str, Any]) -> None: ...


@dataclass
class Allocation:
    layer_sparsity: dict[str, float]  # full layer name -> sparsity
    groups: list[dict[str, Any]]  # name, tower, num_weights, score, sparsity: for the report
    per_tower: dict[str, float]  # parameter-weighted sparsity chosen per tower
    scoring_s: float = 0.0
    cache: str | None = None  # "hit" | "miss" | None (no cache)
    raw: dict[str, Any] = field(default_factory=dict)  # the scores as cached


def needs_scores(spec: AllocationSpec) -> bool:
    return spec.name != "uniform"


def score_inputs(model: nn.Module, inputs: ModelInputs, spec: AllocationSpec) -> ModelInputs:
    """The first num_samples calibration samples, text cut to seq_len (a causal LM's windows only)."""
    tensors = {name: tensor[:spec.num_samples] for name, tensor in inputs.tensors.items()}
    if spec.seq_len is not None and set(tensors) == {"input_ids"}:
        tensors["input_ids"] = tensors["input_ids"][:, :spec.seq_len]
    return ModelInputs(tensors, inputs.options)


def raw_scores(model: nn.Module, towers: Sequence[Tower], inputs: ModelInputs, spec: AllocationSpec, seed: int,
               should_cancel: Callable[[], bool], on_step: Callable[[int, int], None]) -> dict[str, Any]:
    """What the allocation is computed from, as plain JSON: per-layer scores, or outlier counts per group."""
    if spec.name == "ecoflap-zeroth":
        return {"scores": scoring.zeroth_order_scores(model, towers, inputs, spec.eps, seed,
                                                      should_cancel=should_cancel, on_layer=on_step)}
    if spec.name == "ecoflap-first":
        return {"scores": scoring.first_order_scores(model, towers, inputs, should_cancel=should_cancel,
                                                     on_batch=on_step)}
    if spec.name == "owl":
        counts = scoring.outlier_ratios(model, towers, inputs, per_layer=spec.granularity == "layer",
                                        multiple=spec.outlier_multiple, should_cancel=should_cancel)
        return {"outliers": {name: list(count) for name, count in counts.items()}}
    raise JobError("invalid_spec", f"Allocation {spec.name!r} has no scores.")


def cache_options(spec: AllocationSpec, seed: int) -> dict[str, Any]:
    """The options the raw scores depend on (not the target, max_sparsity or spread: those act later)."""
    options: dict[str, Any] = {"allocation": spec.name, "num_samples": spec.num_samples, "seq_len": spec.seq_len,
                               "seed": seed}
    if spec.name == "ecoflap-zeroth":
        options["eps"] = spec.eps
    if spec.name == "owl":
        options.update(granularity=spec.granularity, outlier_multiple=spec.outlier_multiple)
    return options


def allocate(plan: Sequence[tuple[Tower, float]], spec: AllocationSpec, raw: dict[str, Any],
             joint_target: float | None) -> Allocation:
    """Sparsity per layer from raw scores. joint_target: one budget over all towers; None: each tower's own."""
    groups = _groups(plan, spec.granularity)
    if spec.name == "owl":
        outliers = raw["outliers"]
        values = [outliers[g.name][0] / max(outliers[g.name][1], 1) if g.name in outliers else 0.0
                  for g in groups]
    else:
        scores = raw["scores"]
        values = [sum(scores.get(layer, 0.0) for layer in g.layers) for g in groups]
    budgets = ([(list(range(len(groups))), joint_target)] if joint_target is not None else
               [([i for i, g in enumerate(groups) if g.tower == tower.name], target) for tower, target in plan])
    chosen = [0.0] * len(groups)
    for members, target in budgets:
        sizes = [groups[i].num_weights for i in members]
        picked = [values[i] for i in members]
        if spec.name == "owl":
            spread = min(spec.spread, min(target, 1.0 - target) / 2)
            result = budget.owl_spread(picked, sizes, target, spread)
        else:
            result = budget.water_fill(picked, sizes, target, max_sparsity(spec, target))
        for i, value in zip(members, result, strict=True):
            chosen[i] = value
    layer_sparsity = {layer: chosen[i] for i, g in enumerate(groups) for layer in g.layers}
    per_tower = {}
    for tower, _ in plan:
        members = [i for i, g in enumerate(groups) if g.tower == tower.name]
        per_tower[tower.name] = round(budget.weighted_mean([chosen[i] for i in members],
                                                           [groups[i].num_weights for i in members]), 6)
    report = [{"name": g.name, "tower": g.tower, "num_weights": g.num_weights, "score": values[i],
               "sparsity": chosen[i]} for i, g in enumerate(groups)]
    return Allocation(layer_sparsity, report, per_tower, raw=raw)


def max_sparsity(spec: AllocationSpec, target: float) -> float:
    if spec.max_sparsity is not None:
        if spec.max_sparsity < target:
            raise JobError("invalid_spec", f"allocation_options.max_sparsity ({spec.max_sparsity}) is below the "
                                           f"target sparsity ({target}); no allocation can meet the target.")
        return spec.max_sparsity
    return min(target + MAX_SPARSITY_MARGIN, MAX_SPARSITY_CAP)


@dataclass(frozen=True)
class _Group:
    name: str
    tower: str
    layers: tuple[str, ...]
    num_weights: int


def _groups(plan: Sequence[tuple[Tower, float]], granularity: str) -> list[_Group]:
    groups = []
    for tower, _ in plan:
        for index, block in enumerate(tower.blocks):
            linears = block_linears(block)
            names = {name: f"{tower.prefix}.{index}.{name}" for name in linears}
            sizes = {name: weight_matrix(layer).numel() for name, layer in linears.items()}
            if granularity == "layer":
                groups += [_Group(names[n], tower.name, (names[n],), sizes[n]) for n in linears]
            elif linears:
                groups.append(_Group(f"{tower.prefix}.{index}", tower.name, tuple(names.values()),
                                     sum(sizes.values())))
    return groups
