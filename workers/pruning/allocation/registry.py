"""The allocations behind one shape, as methods/ holds the pruning methods: how each scores the dense model,
which of its options the scores depend on (the score cache's key), and how scores become sparsities."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prunekit.vocabulary import MAX_SPARSITY_CAP, default_max_sparsity
from workers.pruning.allocation import budget, scoring, spectral, streamed_scoring
from workers.pruning.allocation.groups import Group
from workers.pruning.allocation.streamed_scoring import Stream
from workers.pruning.models import Tower
from workers.pruning.multimodal import ModelAdapter
from workers.pruning.sequential import ModelInputs
from workers.pruning.spec import AllocationSpec, JobError

# (model, towers, scoring inputs, spec, seed, should_cancel, on_step(done, total), stream) -> plain JSON
# (cacheable). stream: the model is streamed from disk (its blocks read one at a time); None: in memory. The
# scores are the same either way (ecoflap-first's within float rounding: streamed_scoring says why).
Score = Callable[[ModelAdapter, Sequence[Tower], ModelInputs, AllocationSpec, int, Callable[[], bool],
                  Callable[[int, int], None], Stream | None], dict[str, Any]]


@dataclass(frozen=True)
class Allocation:
    name: str
    # None: nothing to score, every layer gets its tower's target (and no calibration is needed for it).
    score: Score | None
    # The options besides num_samples, seq_len and seed that the raw scores depend on (not the target,
    # max_sparsity or spread: those act after scoring, so scores cached under one still serve the others).
    cache_options: Callable[[AllocationSpec], dict[str, Any]]
    # (raw scores, groups) -> one value per group: the higher, the more of the group is kept
    group_values: Callable[[dict[str, Any], Sequence[Group]], list[float]] | None
    # (values, group sizes, target, spec) -> one sparsity per group whose size-weighted mean is the target
    spread: Callable[[list[float], list[int], float, AllocationSpec], list[float]] | None
    # Scores from the weights alone (alphapruning): no calibration data is loaded for them, and their cache key
    # names neither the dataset nor the calibration options.
    data_free: bool = False


def max_sparsity(spec: AllocationSpec, target: float) -> float:
    if spec.max_sparsity is not None:
        if spec.max_sparsity < target:
            raise JobError("invalid_spec", f"allocation_options.max_sparsity ({spec.max_sparsity}) is below the "
                                           f"target sparsity ({target}); no allocation can meet the target.")
        return spec.max_sparsity
    return default_max_sparsity(target)


def _no_options(_spec: AllocationSpec) -> dict[str, Any]:
    return {}


def _streams(name: str, model: ModelAdapter, stream: Stream | None) -> Stream | None:
    """The stream, after checking that this allocation scores this family streamed (streaming refuses the rest
    before loading: this is the last word if something else reaches here)."""
    if stream is not None and not streamed_scoring.streams(name, model.family):
        raise JobError("invalid_spec", f"Allocation {name!r} cannot score a {model.family} model streamed from "
                                       "disk: use a worker with more memory, or another allocation.")
    return stream


def _zeroth_scores(model: ModelAdapter, towers: Sequence[Tower], inputs: ModelInputs, spec: AllocationSpec,
                   seed: int, should_cancel: Callable[[], bool],
                   on_step: Callable[[int, int], None], stream: Stream | None) -> dict[str, Any]:
    if spec.perturbation == "block" and spec.granularity != "block":
        raise JobError("invalid_spec", "allocation_options.perturbation block scores whole blocks; it needs "
                                       "granularity block.")
    if _streams(spec.name, model, stream) is not None:
        assert stream is not None
        return {"scores": streamed_scoring.zeroth_order_streamed(stream, model, towers, inputs, spec.eps, seed,
                                                                 should_cancel, on_step, spec.perturbation)}
    return {"scores": scoring.zeroth_order_scores(model, towers, inputs, spec.eps, seed,
                                                  should_cancel=should_cancel, on_layer=on_step,
                                                  perturbation=spec.perturbation)}


def _first_scores(model: ModelAdapter, towers: Sequence[Tower], inputs: ModelInputs, spec: AllocationSpec,
                  _seed: int, should_cancel: Callable[[], bool],
                  on_step: Callable[[int, int], None], stream: Stream | None) -> dict[str, Any]:
    if _streams(spec.name, model, stream) is not None:
        assert stream is not None
        return {"scores": streamed_scoring.first_order_streamed(stream, model, towers, inputs, should_cancel,
                                                                on_step)}
    return {"scores": scoring.first_order_scores(model, towers, inputs, should_cancel=should_cancel,
                                                 on_batch=on_step)}


def _owl_outliers(model: ModelAdapter, towers: Sequence[Tower], inputs: ModelInputs, spec: AllocationSpec,
                  _seed: int, should_cancel: Callable[[], bool],
                  _on_step: Callable[[int, int], None], stream: Stream | None) -> dict[str, Any]:
    counts = scoring.outlier_ratios(model.model, towers, inputs, per_layer=spec.granularity == "layer",
                                    multiple=spec.outlier_multiple, should_cancel=should_cancel,
                                    **_block_major(spec.name, model, stream))
    return {"outliers": {name: list(count) for name, count in counts.items()}}


def _alpha_hill(model: ModelAdapter, towers: Sequence[Tower], _inputs: ModelInputs, spec: AllocationSpec,
                _seed: int, should_cancel: Callable[[], bool],
                on_step: Callable[[int, int], None], stream: Stream | None) -> dict[str, Any]:
    if _streams(spec.name, model, stream) is not None:
        assert stream is not None
        alphas = streamed_scoring.layer_alphas_blockwise(towers, stream.block, should_cancel=should_cancel,
                                                         on_layer=on_step)
    else:
        alphas = spectral.layer_alphas(towers, should_cancel=should_cancel, on_layer=on_step)
    # None where undefined (a matrix of rank < 2): JSON has no NaN.
    return {"alphas": {name: None if math.isnan(alpha) else alpha for name, alpha in alphas.items()}}


def _dlp_medians(model: ModelAdapter, towers: Sequence[Tower], inputs: ModelInputs, spec: AllocationSpec,
                 _seed: int, should_cancel: Callable[[], bool],
                 _on_step: Callable[[int, int], None], stream: Stream | None) -> dict[str, Any]:
    return {"unimportance": scoring.median_scores(model.model, towers, inputs, per_layer=spec.granularity == "layer",
                                                  should_cancel=should_cancel,
                                                  **_block_major(spec.name, model, stream))}


def _block_major(name: str, model: ModelAdapter, stream: Stream | None) -> dict[str, Any]:
    """The block source and capture home of a Wanda-statistics pass (OWL, DLP) over a streamed model; {} in
    memory."""
    if _streams(name, model, stream) is None:
        return {}
    assert stream is not None
    return {"block": stream.block, "home": stream.home()}


def _zeroth_options(spec: AllocationSpec) -> dict[str, Any]:
    # "tensor" adds nothing: the keys of scores cached before the option existed stay valid.
    return {"eps": spec.eps} | ({"perturbation": spec.perturbation} if spec.perturbation != "tensor" else {})


def _granularity_options(spec: AllocationSpec) -> dict[str, Any]:
    return {"granularity": spec.granularity}


def _owl_options(spec: AllocationSpec) -> dict[str, Any]:
    return {"granularity": spec.granularity, "outlier_multiple": spec.outlier_multiple}


def _summed_scores(raw: dict[str, Any], groups: Sequence[Group]) -> list[float]:
    scores = raw["scores"]  # per layer, or per block (perturbation "block"): then under the group's own name
    return [scores[g.name] if g.name in scores else sum(scores.get(layer, 0.0) for layer in g.layers)
            for g in groups]


def _mean_alphas(raw: dict[str, Any], groups: Sequence[Group]) -> list[float]:
    """A block's exponent is the plain mean of its layers' (AlphaPruning's block_wise mapping); a group whose
    every exponent is undefined takes the mean of all groups', so that the mapping puts it in the middle."""
    alphas = raw["alphas"]
    values = [[alphas[layer] for layer in g.layers if alphas.get(layer) is not None] for g in groups]
    means = [sum(v) / len(v) if v else None for v in values]
    known = [m for m in means if m is not None]
    if not known:
        raise JobError("invalid_spec", "alphapruning found no weight matrix with two or more nonzero singular "
                                       "values; it has nothing to rank the blocks by.")
    return [m if m is not None else sum(known) / len(known) for m in means]


def _unimportance(raw: dict[str, Any], groups: Sequence[Group]) -> list[float]:
    medians = raw["unimportance"]
    known = [medians[g.name] for g in groups if g.name in medians]
    # A group no calibration input reached (a Q-Former text sublayer) is left at the others' mean.
    fill = sum(known) / len(known) if known else 0.0
    return [float(medians.get(g.name, fill)) for g in groups]


def _outlier_ratios(raw: dict[str, Any], groups: Sequence[Group]) -> list[float]:
    outliers = raw["outliers"]
    return [outliers[g.name][0] / max(outliers[g.name][1], 1) if g.name in outliers else 0.0 for g in groups]


def _water_fill(values: list[float], sizes: list[int], target: float, spec: AllocationSpec) -> list[float]:
    return budget.water_fill(values, sizes, target, max_sparsity(spec, target))


def _owl_spread(values: list[float], sizes: list[int], target: float, spec: AllocationSpec) -> list[float]:
    spread = min(spec.spread, min(target, 1.0 - target) / 2)
    return budget.owl_spread(values, sizes, target, spread)


def _alpha_spread(values: list[float], sizes: list[int], target: float, spec: AllocationSpec) -> list[float]:
    # The paper caps nothing; a group is held at max_sparsity when the job sets it, else just below 1.
    cap = max_sparsity(spec, target) if spec.max_sparsity is not None else MAX_SPARSITY_CAP
    return budget.alpha_spread(values, sizes, target, spec.epsilon, max(cap, target))


def _dlp_spread(values: list[float], sizes: list[int], target: float, spec: AllocationSpec) -> list[float]:
    # As OWL's lambda: half the room on either side of the target at most, so that the shift stays in [0, 1].
    return budget.dlp_spread(values, sizes, target, min(spec.alpha, min(target, 1.0 - target) / 2))


ALLOCATIONS: dict[str, Allocation] = {
    "uniform": Allocation("uniform", None, _no_options, None, None),
    "ecoflap-zeroth": Allocation("ecoflap-zeroth", _zeroth_scores, _zeroth_options, _summed_scores, _water_fill),
    "ecoflap-first": Allocation("ecoflap-first", _first_scores, _no_options, _summed_scores, _water_fill),
    "owl": Allocation("owl", _owl_outliers, _owl_options, _outlier_ratios, _owl_spread),
    "alphapruning": Allocation("alphapruning", _alpha_hill, _no_options, _mean_alphas, _alpha_spread,
                               data_free=True),
    "dlp": Allocation("dlp", _dlp_medians, _granularity_options, _unimportance, _dlp_spread),
}


def get_allocation(name: str) -> Allocation:
    try:
        return ALLOCATIONS[name]
    except KeyError:
        raise JobError("invalid_spec", f"Allocation {name!r} is not available; use one of "
                                       f"{', '.join(ALLOCATIONS)}.") from None
