"""A job's allocation: scores (or outlier counts) per layer, grouped per block or layer, turned into sparsities.

Without per-tower targets, one joint allocation spans every pruned tower (ECoFLaP's setting for
vision-language models); with targets, each tower meets its own budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from workers.pruning.allocation import budget
from workers.pruning.allocation.groups import groups as find_groups
from workers.pruning.allocation.registry import get_allocation
from workers.pruning.allocation.streamed_scoring import Stream
from workers.pruning.models import Tower
from workers.pruning.multimodal import AnyModel, adapt
from workers.pruning.sequential import ModelInputs
from workers.pruning.spec import AllocationSpec, JobError


@dataclass
class LayerSparsities:
    """What an allocation chose for one target: every layer's sparsity, and the groups' for the report."""

    layer_sparsity: dict[str, float]  # full layer name -> sparsity
    groups: list[dict[str, Any]]  # name, tower, num_weights, score, sparsity: for the report
    per_tower: dict[str, float]  # parameter-weighted sparsity chosen per tower


def needs_scores(spec: AllocationSpec) -> bool:
    return get_allocation(spec.name).score is not None


def needs_data(spec: AllocationSpec) -> bool:
    """Whether the allocation's scores need calibration data (alphapruning's come from the weights alone)."""
    allocation = get_allocation(spec.name)
    return allocation.score is not None and not allocation.data_free


def score_inputs(model: AnyModel, inputs: ModelInputs, spec: AllocationSpec) -> ModelInputs:
    """The first num_samples calibration samples, text cut to seq_len (a causal LM's windows only)."""
    tensors = {name: tensor[:spec.num_samples] for name, tensor in inputs.tensors.items()}
    if spec.seq_len is not None and set(tensors) == {"input_ids"}:
        tensors["input_ids"] = tensors["input_ids"][:, :spec.seq_len]
    return ModelInputs(tensors, inputs.options)


def raw_scores(model: AnyModel, towers: Sequence[Tower], inputs: ModelInputs | None, spec: AllocationSpec,
               seed: int, should_cancel: Callable[[], bool], on_step: Callable[[int, int], None],
               stream: Stream | None = None) -> dict[str, Any]:
    """What the allocation is computed from, as plain JSON: per-layer scores, or outlier counts per group.
    inputs may be None for a data-free allocation. stream: the model is streamed from disk (block by block)."""
    allocation = get_allocation(spec.name)
    if allocation.score is None:
        raise JobError("invalid_spec", f"Allocation {spec.name!r} has no scores.")
    if inputs is None and not allocation.data_free:
        raise JobError("invalid_spec", f"Allocation {spec.name!r} needs calibration data.")
    return allocation.score(adapt(model), towers, inputs if inputs is not None else ModelInputs({}), spec, seed,
                            should_cancel, on_step, stream)


def cache_options(spec: AllocationSpec, seed: int) -> dict[str, Any]:
    """The options the raw scores depend on (not the target, max_sparsity or spread: those act later)."""
    allocation = get_allocation(spec.name)
    if allocation.data_free:
        return {"allocation": spec.name, **allocation.cache_options(spec)}
    return {"allocation": spec.name, "num_samples": spec.num_samples, "seq_len": spec.seq_len, "seed": seed,
            **allocation.cache_options(spec)}


def allocate(plan: Sequence[tuple[Tower, float]], spec: AllocationSpec, raw: dict[str, Any],
             joint_target: float | None) -> LayerSparsities:
    """Sparsity per layer from raw scores. joint_target: one budget over all towers; None: each tower's own."""
    allocation = get_allocation(spec.name)
    if allocation.group_values is None or allocation.spread is None:
        raise JobError("invalid_spec", f"Allocation {spec.name!r} has no scores.")
    groups = find_groups(plan, spec.granularity)
    values = allocation.group_values(raw, groups)
    budgets = ([(list(range(len(groups))), joint_target)] if joint_target is not None else
               [([i for i, g in enumerate(groups) if g.tower == tower.name], target) for tower, target in plan])
    chosen = [0.0] * len(groups)
    for members, target in budgets:
        sizes = [groups[i].num_weights for i in members]
        result = allocation.spread([values[i] for i in members], sizes, target, spec)
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
    return LayerSparsities(layer_sparsity, report, per_tower)
