"""The contract's pure rules, written once for the API's validation and the engine's checks."""

from __future__ import annotations

import math
import re

from prunekit.vocabulary.names import (
    JOB_MODEL_SCHEME,
    OFFLOAD_CPU,
    OFFLOAD_MEMORY,
    OFFLOAD_MODES,
    SWEEP_FOLDER,
    UNIFORM,
    UNSTRUCTURED,
)

_NM = re.compile(r"^(\d+):(\d+)$")
# Two sparsities closer than this are the same request (a float sent as 0.5 may arrive as 0.49999999999).
SPARSITY_TOLERANCE = 1e-9
# ECoFLaP's cap on any group's sparsity when allocation_options.max_sparsity is left out: the target + the margin.
MAX_SPARSITY_MARGIN = 0.1
MAX_SPARSITY_CAP = 0.99


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """None for "unstructured", (n, m) for "n:m"; ValueError for anything else."""
    if pattern == UNSTRUCTURED:
        return None
    match = _NM.match(pattern)
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise ValueError(f"unknown sparsity pattern {pattern!r}: "
                         "expected 'unstructured' or 'N:M' with 0 < N < M")
    return int(match[1]), int(match[2])


def nm_pattern(pattern: str | None) -> tuple[int, int] | None:
    """(n, m) of an N:M pattern; None for unstructured, for no pattern and for a pattern that is not valid (the
    validation that refuses it says so; a rule asking "is it N:M?" answers no)."""
    if not pattern:
        return None
    try:
        return parse_pattern(pattern)
    except ValueError:
        return None


def fixed_sparsity(pattern: str | None) -> float | None:
    """An N:M pattern prunes exactly m - n of every m weights: the sparsity is 1 - n/m, and no other target can be
    met. None when the pattern leaves the sparsity free."""
    nm = nm_pattern(pattern)
    return None if nm is None else 1 - nm[0] / nm[1]


def same_sparsity(a: float, b: float) -> bool:
    return math.isclose(a, b, abs_tol=SPARSITY_TOLERANCE)


def fits_pattern(sparsity: float, pattern: str | None) -> bool:
    """Whether a sparsity can be asked for together with the pattern."""
    fixed = fixed_sparsity(pattern)
    return fixed is None or same_sparsity(sparsity, fixed)


def in_open_unit(value: float) -> bool:
    """Sparsities lie strictly between 0 (nothing pruned) and 1 (everything)."""
    return 0.0 < value < 1.0


def allocation_decides(allocation: str) -> bool:
    """Whether the allocation chooses sparsities itself (and so takes allocation_options)."""
    return allocation != UNIFORM


def allocation_fits_pattern(allocation: str, pattern: str | None) -> bool:
    """An N:M pattern fixes every layer's sparsity, so a non-uniform allocation has nothing to decide."""
    return not (allocation_decides(allocation) and nm_pattern(pattern) is not None)


def sweep_fits_pattern(pattern: str | None) -> bool:
    """An N:M pattern fixes the sparsity, so a sweep has nothing to vary."""
    return nm_pattern(pattern) is None


def default_max_sparsity(target: float) -> float:
    """ECoFLaP's cap when allocation_options.max_sparsity is left out: the target + 0.1, below 1."""
    return min(target + MAX_SPARSITY_MARGIN, MAX_SPARSITY_CAP)


def offload_mode(value: bool | str) -> str:
    """The API's `offload` (false, true, "cpu", "disk") as one of OFFLOAD_MODES: true is "cpu", its first name."""
    if value is True:
        return OFFLOAD_CPU
    if value is False:
        return OFFLOAD_MEMORY
    if value not in OFFLOAD_MODES:
        raise ValueError(f"offload {value!r} is not one of {', '.join(OFFLOAD_MODES)}")
    return value


# --- chained jobs -----------------------------------------------------------------------------------------


def parse_job_model_ref(ref: str) -> tuple[str, str | None] | None:
    """`job:<id>` -> (id, None); `job:<id>/sparsity-<s>` -> (id, "<s>" as written); None for another reference."""
    if not ref.startswith(f"{JOB_MODEL_SCHEME}:"):
        return None
    job_id, _, folder = ref.removeprefix(f"{JOB_MODEL_SCHEME}:").partition("/")
    return job_id, folder.removeprefix(SWEEP_FOLDER) if folder else None


def sweep_folder(sparsity: float) -> str:
    """The folder of a sweep's pruned model at this sparsity, as the engine names it (and its artifacts)."""
    return f"{SWEEP_FOLDER}{sparsity:g}"


# --- task files ------------------------------------------------------------------------------------


def task_record_problem(record: object, limits: dict[str, int] | None = None) -> str | None:
    """What is wrong with one item of a task file ({"context": str, "choices": [str, ...], "answer": int}), naming
    the field; None when nothing is. The API checks an upload with it and the engine every file it reads."""
    from prunekit.vocabulary.limits import TASK_LIMITS

    limits = limits or TASK_LIMITS
    if not isinstance(record, dict):
        return "is not a JSON object"
    context, choices, answer = record.get("context"), record.get("choices"), record.get("answer")
    if not isinstance(context, str):
        return "field 'context' must be a string (the text the choices continue)"
    if len(context) > limits["chars"]:
        return f"field 'context' has {len(context)} characters; at most {limits['chars']}"
    if not isinstance(choices, list) or not 2 <= len(choices) <= limits["choices"]:
        return f"field 'choices' must be a list of 2 to {limits['choices']} strings"
    for index, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice.strip():
            return f"field 'choices' item {index} must be a non-empty string"
        if len(choice) > limits["chars"]:
            return f"field 'choices' item {index} has {len(choice)} characters; at most {limits['chars']}"
    if len(set(choices)) != len(choices):
        return "field 'choices' holds the same choice twice (the answer would be ambiguous)"
    # bool is an int in Python and JSON's true would pass as 1: refused, it is surely a mistake.
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        return f"field 'answer' must be the index of the right choice, an integer from 0 to {len(choices) - 1}"
    return None
