"""Schemathesis hooks for the contract runs (tests/api/test_contract.py): one check of our own.

A request the schema allows must be accepted, or be refused for a reason the document lists: each operation's
`422` response names its refusals (`x-refusals`, from app/refusals.py). For the operations that have such a list,
the run lets `positive_data_acceptance` take a 422, and this check makes sure that 422 is one of them.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from schemathesis import Case, CheckContext, Response


@schemathesis.check
def refusal_is_documented(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 422:
        return None
    documented: list[dict[str, Any]] = (case.operation.definition.raw.get("responses", {}).get("422", {})
                                        .get("x-refusals") or [])
    if not documented:
        return None  # positive_data_acceptance, with no 422 among its statuses here, reports it
    try:
        body = response.json()
    except ValueError:
        body = {}
    said = (body.get("code"), body.get("param")) if isinstance(body, dict) else (None, None)
    if any((r["code"], r["param"]) == said for r in documented):
        return None
    raise AssertionError(f"A request the schema allows was refused with {said[0]} on {said[1]}, which is not one "
                         "of the operation's documented refusals (x-refusals): the schema must say why, or the "
                         "server must accept it")
