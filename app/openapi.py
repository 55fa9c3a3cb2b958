"""The published OpenAPI document: every operation's errors are RFC 9457 problem+json, as the API sends them.

FastAPI documents a 422 with its own validation body and nothing else; clients generated from that would
mis-parse every real error, so each operation gets a `default` problem+json response instead. The document also
says what FastAPI leaves out: the bearer key every /v1 route needs, the links by which one response's ids name the
next request's resource, the refusals no schema can state (app/refusals.py), and how a dataset file is sent.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.errors import PROBLEM_JSON
from app.refusals import REFUSALS
from app.schemas import ProblemOut

_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
_PROBLEM_CONTENT = {PROBLEM_JSON: {"schema": _PROBLEM_REF}}
BEARER = "bearerAuth"

# (method, path, status) of a response -> link name -> (method, path, {parameter: runtime expression}).
_ID = "$response.body#/id"
_FIRST = "$response.body#/data/0/id"
_JOB_READS = (("GetJob", "get", "/v1/jobs/{job_id}"), ("CancelJob", "post", "/v1/jobs/{job_id}/cancel"),
              ("ListJobEvents", "get", "/v1/jobs/{job_id}/events"),
              ("StreamJobEvents", "get", "/v1/jobs/{job_id}/events/stream"),
              ("ListJobArtifacts", "get", "/v1/jobs/{job_id}/artifacts"))
_DATASET_USES = (("GetDataset", "get", "/v1/datasets/{dataset_id}"),
                 ("DeleteDataset", "delete", "/v1/datasets/{dataset_id}"))
_MODEL_USES = (("GetModel", "get", "/v1/models/{model_id}"), ("DeleteModel", "delete", "/v1/models/{model_id}"))
_ARTIFACT_READS = (("GetArtifact", "get", "/v1/artifacts/{artifact_id}"),
                   ("DownloadArtifact", "get", "/v1/artifacts/{artifact_id}/content"))
LINKS: dict[tuple[str, str, str], dict[str, tuple[str, str, dict[str, str]]]] = {
    ("post", "/v1/jobs", "201"): {name: (m, p, {"job_id": _ID}) for name, m, p in _JOB_READS},
    ("post", "/v1/jobs/{job_id}/cancel", "200"): {name: (m, p, {"job_id": _ID}) for name, m, p in _JOB_READS},
    ("get", "/v1/jobs/{job_id}", "200"): {name: (m, p, {"job_id": _ID}) for name, m, p in _JOB_READS[1:]},
    ("post", "/v1/datasets", "201"): {name: (m, p, {"dataset_id": _ID}) for name, m, p in _DATASET_USES},
    ("post", "/v1/models", "201"): {name: (m, p, {"model_id": _ID}) for name, m, p in _MODEL_USES},
    ("get", "/v1/jobs/{job_id}/artifacts", "200"): {name: (m, p, {"artifact_id": _FIRST})
                                                    for name, m, p in _ARTIFACT_READS},
    ("get", "/v1/artifacts/{artifact_id}", "200"): {name: (m, p, {"artifact_id": _ID})
                                                    for name, m, p in _ARTIFACT_READS[1:]},
}
# An upload as docs/api.md describes one: a text file, one record a line.
_DATASET_EXAMPLE = {"file": "The first calibration text.\nThe second one.\n", "name": "notes"}
# A dataset is sent as a file part whose name's extension tells its kind (app/api/datasets.py); the part's own
# Content-Type is not read.
_DATASET_FILE_ENCODING = {
    "headers": {"Content-Disposition": {"schema": {"type": "string"},
                                        "example": 'form-data; name="file"; filename="data.txt"'}},
}


_MODEL_FILE_ENCODING = {
    "headers": {"Content-Disposition": {"schema": {"type": "string"},
                                        "example": 'form-data; name="file"; filename="model.zip"'}},
}


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
    components_root = schema["components"]
    components_root.setdefault("securitySchemes", {})[BEARER] = {
        "type": "http", "scheme": "bearer", "description": "an API key, pk_..."}
    operation_ids = {(method, path): operation["operationId"]
                     for path, item in schema.get("paths", {}).items() for method, operation in item.items()}
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if path.startswith("/v1/"):
                operation["security"] = [{BEARER: []}]
            refusals = REFUSALS.get((method, path))
            if refusals:
                responses["422"] = {
                    "description": "Invalid, or one of the refusals the schema cannot state: "
                                   + "; ".join(f"{r.code} on {r.param}: {r.reason}" for r in refusals),
                    "content": _PROBLEM_CONTENT,
                    "x-refusals": [r._asdict() for r in refusals],
                }
            responses["default"] = {"description": "An error, as RFC 9457 problem+json", "content": _PROBLEM_CONTENT}
            for status, links in _links_of(method, path, operation_ids).items():
                responses[status]["links"] = links
    upload = schema["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]["multipart/form-data"]
    upload["encoding"] = {"file": _DATASET_FILE_ENCODING}
    upload["example"] = _DATASET_EXAMPLE
    # A model archive is sent as a file part whose name says the archive's kind (app/api/models.py).
    model_upload = schema["paths"]["/v1/models"]["post"]["requestBody"]["content"]["multipart/form-data"]
    model_upload["encoding"] = {"file": _MODEL_FILE_ENCODING}
    return schema


def _links_of(method: str, path: str, operation_ids: dict[tuple[str, str], str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for (m, p, status), links in LINKS.items():
        if (m, p) == (method, path):
            out[status] = {name: {"operationId": operation_ids[(target_method, target_path)], "parameters": params}
                           for name, (target_method, target_path, params) in links.items()}
    return out
