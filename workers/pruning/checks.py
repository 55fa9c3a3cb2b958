"""What a PruneSpec is checked for before anything is loaded; which towers the model has is checked once it is.

The rules are the vocabulary's, which the API validates requests with too; the messages are the engine's own (a
spec may come from a caller other than the API).
"""

from __future__ import annotations

from prunekit.vocabulary import (
    ALLOCATIONS,
    GRANULARITIES,
    TOWERS,
    allocation_fits_pattern,
    fits_pattern,
    fixed_sparsity,
    in_open_unit,
    parse_pattern,
    sweep_fits_pattern,
)
from workers.pruning.spec import JobError, PruneSpec


def check_spec(spec: PruneSpec) -> None:
    """Raises JobError (invalid_spec, unsupported_pattern) for a spec no run could carry out."""
    _check(spec)
    _check_targets(spec)
    _check_allocation(spec)
    _check_budget(spec)


def _check(spec: PruneSpec) -> None:
    if not in_open_unit(spec.sparsity):
        raise JobError("invalid_spec", f"Sparsity must be between 0 and 1 (exclusive); got {spec.sparsity}.")
    try:
        parse_pattern(spec.pattern)
    except ValueError:
        raise JobError("unsupported_pattern", f"Pattern {spec.pattern!r} is not available; use 'unstructured' "
                                              "or N:M such as '2:4' or '4:8'.") from None
    # An N:M pattern prunes exactly m - n of every m weights: a different target could never be met.
    if not fits_pattern(spec.sparsity, spec.pattern):
        raise JobError("invalid_spec", f"Pattern {spec.pattern} fixes sparsity at {fixed_sparsity(spec.pattern):g}; "
                                       f"got {spec.sparsity}.")


def _check_targets(spec: PruneSpec) -> None:
    """What can be checked before loading; which towers the model has is checked once it is loaded."""
    for name, value in (spec.targets or {}).items():
        if name not in TOWERS:
            raise JobError("invalid_spec", f"targets has an unknown tower {name!r}; towers: {', '.join(TOWERS)}.")
        if not in_open_unit(value):
            raise JobError("invalid_spec", f"targets[{name!r}] must be between 0 and 1 (exclusive); got {value}.")
        if not fits_pattern(value, spec.pattern):  # _check has already refused unknown patterns
            raise JobError("invalid_spec", f"Pattern {spec.pattern} fixes sparsity at "
                                           f"{fixed_sparsity(spec.pattern):g}; got targets[{name!r}] = {value}.")


def _check_allocation(spec: PruneSpec) -> None:
    allocation = spec.allocation
    if allocation.name not in ALLOCATIONS:
        raise JobError("invalid_spec", f"Allocation {allocation.name!r} is not available; use one of "
                                       f"{', '.join(ALLOCATIONS)}.")
    if allocation.granularity not in GRANULARITIES:
        raise JobError("invalid_spec", f"allocation_options.granularity must be 'block' or 'layer'; got "
                                       f"{allocation.granularity!r}.")
    if not allocation_fits_pattern(allocation.name, spec.pattern):
        raise JobError("invalid_spec", f"Pattern {spec.pattern} fixes every layer's sparsity, so allocation "
                                       f"{allocation.name!r} has nothing to decide; use allocation 'uniform'.")
    if allocation.num_samples < 1 or (allocation.seq_len is not None and allocation.seq_len < 2):
        raise JobError("invalid_spec", "allocation_options.num_samples must be >= 1 and seq_len >= 2.")
    if not allocation.eps > 0:
        raise JobError("invalid_spec", f"allocation_options.eps must be positive; got {allocation.eps}.")
    for value in spec.sweep:
        if not in_open_unit(value):
            raise JobError("invalid_spec", f"Sweep sparsities must be between 0 and 1 (exclusive); got {value}.")
    lowest = min(spec.sweep or (spec.sparsity,))
    if allocation.max_sparsity is not None and not lowest <= allocation.max_sparsity < 1.0:
        raise JobError("invalid_spec", f"allocation_options.max_sparsity must be at least the target sparsity "
                                       f"({lowest}) and below 1; got {allocation.max_sparsity}.")
    if spec.sweep and spec.targets is not None:
        raise JobError("invalid_spec", "A sweep varies one sparsity for every tower; it cannot be combined "
                                       "with per-tower targets.")
    if spec.sweep and not sweep_fits_pattern(spec.pattern):
        raise JobError("invalid_spec", f"Pattern {spec.pattern} fixes the sparsity; a sweep has nothing to vary.")


def _check_budget(spec: PruneSpec) -> None:
    """A budget job searches one sparsity for every tower, which a pattern must leave free."""
    budget = spec.budget
    if budget is None:
        return
    if (budget.max_perplexity_ratio is None) == (budget.max_accuracy_drop is None):
        raise JobError("invalid_spec", "budget names exactly one bound: max_perplexity_ratio or max_accuracy_drop.")
    if budget.max_perplexity_ratio is not None and not budget.max_perplexity_ratio > 1.0:
        raise JobError("invalid_spec", "budget.max_perplexity_ratio must be above 1; got "
                                       f"{budget.max_perplexity_ratio}.")
    if budget.max_accuracy_drop is not None and not 0.0 <= budget.max_accuracy_drop < 1.0:
        raise JobError("invalid_spec", f"budget.max_accuracy_drop must be in [0, 1); got {budget.max_accuracy_drop}.")
    if not (0.0 < budget.min_sparsity <= budget.max_sparsity < 1.0 and budget.step > 0.0):
        raise JobError("invalid_spec", "budget: need 0 < min_sparsity <= max_sparsity < 1 and step > 0; got "
                                       f"{budget.min_sparsity}, {budget.max_sparsity}, {budget.step}.")
    if spec.sweep or spec.targets is not None:
        raise JobError("invalid_spec", "A budget job searches one sparsity for every tower; it cannot be combined "
                                       "with a sweep or per-tower targets.")
    if not sweep_fits_pattern(spec.pattern):
        raise JobError("invalid_spec", f"Pattern {spec.pattern} fixes the sparsity; a budget has nothing to search.")
    if spec.allocation.max_sparsity is not None and spec.allocation.max_sparsity < budget.max_sparsity:
        raise JobError("invalid_spec", f"allocation_options.max_sparsity ({spec.allocation.max_sparsity}) is below "
                                       f"budget.max_sparsity ({budget.max_sparsity}).")
