"""The published OpenAPI document: every operation's errors are RFC 9457 problem+json, as the API sends them.

FastAPI documents a 422 with its own validation body and nothing else; clients generated from that would
mis-parse every real error, so each operation gets a `default` problem+json response instead.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.errors import PROBLEM_JSON
from app.schemas import ProblemOut

_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = with_problem_responses(get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def with_problem_responses(schema: dict[str, Any]) -> dict[str, Any]:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    problem = ProblemOut.model_json_schema(ref_template="#/components/schemas/{model}")
    problem["properties"]["errors"] = {
        "type": "array", "description": "Every invalid field, for 422",
        "items": {"type": "object", "properties": {"param": {"type": "string"}, "detail": {"type": "string"}}},
    }
    components["Problem"] = problem
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            responses["default"] = {"description": "An error, as RFC 9457 problem+json",
                                    "content": {PROBLEM_JSON: {"schema": _PROBLEM_REF}}}
    return schema
