"""The rules that tie a job request's fields together, written as JSON Schema for the published document.

JobCreate's validators (app/schemas.py) enforce them; this module states the same rules where a client, and a
generator of requests, can read them: whatever the schema allows is accepted. Each rule here mirrors one
validator; the rules JSON Schema cannot state (comparisons between two numbers, and what depends on the server's
state) are listed as the documented refusals of the operation instead (app/refusals.py).
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

from prunekit.vocabulary import OFFLOAD_MODES, PATTERNS, UNIFORM, fits_pattern, fixed_sparsity, same_sparsity

_NULL = {"type": "null"}


def job_rules(schema: dict[str, Any]) -> None:
    """Adds the cross-field rules to JobCreate's JSON schema (pydantic calls it with the generated schema)."""
    rules: list[dict[str, Any]] = [
        # The route: sparsity is required unless a sweep gives the sparsities or a budget searches for one.
        {"anyOf": [{"required": ["sparsity"], "properties": {"sparsity": {"type": "number"}}},
                   {"required": ["sweep"], "properties": {"sweep": {"type": "object"}}},
                   {"required": ["budget"], "properties": {"budget": {"type": "object"}}}]},
        # _options_fit: a uniform allocation (also the default) takes no options; `{}` and null are accepted.
        {"if": {"properties": {"allocation": {"const": UNIFORM}}},
         "then": {"properties": {"allocation_options": {"anyOf": [_NULL, {"type": "object", "maxProperties": 0}]}}}},
        # _sweep_fits: a sweep cannot be combined with per-tower targets.
        {"if": {"required": ["sweep"], "properties": {"sweep": {"type": "object"}}},
         "then": {"properties": {"targets": _NULL}}},
        # _not_with_offload: offloading (true, "cpu") or streaming ("disk") and restoration exclude each other.
        {"if": {"required": ["offload"], "properties": {"offload": {"enum": [True, *OFFLOAD_MODES[1:]]}}},
         "then": {"properties": {"restore": _NULL}}},
    ]
    rules += _budget_rules()
    for pattern in PATTERNS:
        fixed = fixed_sparsity(pattern)
        if fixed is None:
            continue
        low, high = fitting_range(fixed)
        fitting = {"type": "number", "minimum": low, "maximum": high}
        # An N:M pattern fixes the sparsity (_fixed_by_pattern, _known_towers), leaves a sweep nothing to vary
        # (_sweep_fits) and an allocation nothing to decide (_options_fit).
        rules.append({
            "if": {"required": ["pattern"], "properties": {"pattern": {"const": pattern}}},
            "then": {"properties": {
                "sparsity": {"anyOf": [_NULL, fitting]},
                "targets": {"anyOf": [_NULL, {"type": "object", "additionalProperties": fitting}]},
                "sweep": _NULL,
                "budget": _NULL,  # _budget_alone: a budget has nothing to search either
                "allocation": {"const": UNIFORM},
            }},
        })
    schema["allOf"] = rules


def _budget_rules() -> list[dict[str, Any]]:
    """_budget_alone: a budget gives no sparsity, sweep or targets beside it, and its bound's metric
    stays measured."""
    budget = {"required": ["budget"], "properties": {"budget": {"type": "object"}}}
    rules: list[dict[str, Any]] = [
        {"if": budget, "then": {"properties": {"sparsity": _NULL, "sweep": _NULL, "targets": _NULL}}}]
    for bound, measured in (("max_perplexity_ratio", "perplexity"), ("max_accuracy_drop", "accuracy")):
        rules.append({
            "if": {"required": ["budget"], "properties": {"budget": {
                "type": "object", "required": [bound], "properties": {bound: {"type": "number"}}}}},
            "then": {"properties": {"evaluation": {"properties": {measured: {"const": True}}}}}})
    return rules


@cache
def fitting_range(fixed: float) -> tuple[float, float]:
    """The smallest and the largest float that `fits_pattern` takes for this fixed sparsity: the vocabulary
    compares with a tolerance, and the schema's inclusive bounds must admit exactly the same numbers."""
    return _edge(fixed, -1.0), _edge(fixed, 1.0)


def _edge(fixed: float, direction: float) -> float:
    inside, outside = fixed, fixed + direction * 1e-6  # the tolerance is 1e-9: far outside
    assert not same_sparsity(outside, fixed)
    # Bisect on the floats between them until the two are neighbours; the inside one is the bound.
    while math.nextafter(inside, outside) != outside:
        middle = (inside + outside) / 2
        if middle in (inside, outside):
            break
        if same_sparsity(middle, fixed):
            inside = middle
        else:
            outside = middle
    assert fits_pattern(inside, _pattern_of(fixed)) and not fits_pattern(outside, _pattern_of(fixed))
    return inside


def _pattern_of(fixed: float) -> str:
    return next(p for p in PATTERNS if fixed_sparsity(p) == fixed)
