"""Bad input gets RFC 9457 problem+json naming the field; service routes answer truthfully."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from prunekit.core.config import Settings

JOB = {"model": "local:tiny-llama", "method": "wanda", "sparsity": 0.5}


def assert_problem(response: Any, status: int, param: str | None, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert {"type", "title", "status", "detail", "code"} <= body.keys()
    assert body["status"] == status and body["detail"]
    assert body.get("param") == param
    if code:
        assert body["code"] == code
    return body


@pytest.mark.parametrize(("overrides", "param"), [
    ({"method": "prune-it-all"}, "method"),
    ({"sparsity": 0}, "sparsity"),
    ({"sparsity": 1}, "sparsity"),
    ({"sparsity": -0.1}, "sparsity"),
    ({"sparsity": 1.5}, "sparsity"),
    ({"sparsity": "half"}, "sparsity"),
    ({"model": "tiny-llama"}, "model"),
    ({"model": "local:../etc"}, "model"),
    ({"model": "local:/etc/passwd"}, "model"),
    ({"model": "hf:no-slash"}, "model"),
    ({"model": "s3://UPPER/case"}, "model"),
    ({"model": "ftp://host/model"}, "model"),
    ({"pattern": "3:7"}, "pattern"),
    ({"allocation": "greedy"}, "allocation"),
    ({"allocation": "owl", "pattern": "2:4"}, "allocation_options"),  # N:M fixes every layer's sparsity
    ({"allocation_options": {"eps": 0.01}}, "allocation_options"),   # options of a uniform allocation
    ({"allocation": "ecoflap-zeroth", "allocation_options": {"eps": 0}}, "allocation_options.eps"),
    ({"allocation": "ecoflap-zeroth", "allocation_options": {"granularity": "row"}},
     "allocation_options.granularity"),
    ({"allocation": "ecoflap-zeroth", "allocation_options": {"max_sparsity": 0.4}}, "allocation_options"),
    ({"allocation": "owl", "allocation_options": {"temperature": 1}}, "allocation_options.temperature"),
    ({"calibration": {"num_samples": 0}}, "calibration.num_samples"),
    ({"calibration": {"dataset": "builtin:nope"}}, "calibration.dataset"),
    ({"evaluation": {"seq_len": 10**6}}, "evaluation.seq_len"),
    ({"colour": "blue"}, "colour"),
    ({"sweep": {"sparsities": [0.6, 0.7]}}, "sweep"),                # must include the job's sparsity
    ({"sweep": {"sparsities": [0.5, 1.0]}}, "sweep.sparsities"),
    ({"sweep": {"sparsities": []}}, "sweep.sparsities"),
    ({"sweep": {"sparsities": [0.5, 0.5]}}, "sweep.sparsities"),
    ({"sweep": {"sparsities": [0.5]}, "pattern": "2:4"}, "sweep"),  # 2:4 fixes the sparsity: nothing to vary
    ({"sweep": {"sparsities": [0.5]}, "targets": {"language": 0.5}}, "sweep"),
    ({"restore": {"method": "sparse-lora", "rank": 0}}, "restore.rank"),
    ({"restore": {"lr": 0}}, "restore.lr"),
    ({"restore": {"method": "qlora"}}, "restore.method"),
    ({"restore": {}, "offload": True}, "restore"),                   # training needs the whole model on the device
    ({"restore": {}, "offload": "disk"}, "restore"),                 # ... which streaming never holds
    ({"offload": "memory"}, "offload"),                              # false, true, "cpu" or "disk"
])
def test_invalid_job_fields_name_the_param(client: TestClient, auth: dict[str, str], overrides: dict[str, Any],
                                           param: str) -> None:
    response = client.post("/v1/jobs", json={**JOB, **overrides}, headers=auth)
    assert_problem(response, 422, param, "invalid_request")


def test_missing_field_and_malformed_json(client: TestClient, auth: dict[str, str]) -> None:
    assert_problem(client.post("/v1/jobs", json={"model": "local:tiny-llama", "sparsity": 0.5}, headers=auth),
                   422, "method")
    without_sparsity = {key: value for key, value in JOB.items() if key != "sparsity"}
    assert_problem(client.post("/v1/jobs", json=without_sparsity, headers=auth), 422, "sparsity")
    response = client.post("/v1/jobs", content=b"{not json", headers={**auth, "content-type": "application/json"})
    assert response.status_code == 422 and response.headers["content-type"] == "application/problem+json"


def test_unknown_local_model(client: TestClient, auth: dict[str, str]) -> None:
    response = client.post("/v1/jobs", json={**JOB, "model": "local:no-such-model"}, headers=auth)
    body = assert_problem(response, 422, "model", "unknown_model")
    assert "no-such-model" in body["detail"]


@pytest.mark.parametrize("header", [None, "Bearer pk_wrong", "Bearer ", "Basic dXNlcjpwYXNz", "pk_no_scheme"])
def test_missing_or_wrong_key_is_401(client: TestClient, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    for method, path in [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/capabilities"),
                         ("GET", "/v1/jobs/job_x/events"), ("GET", "/v1/artifacts/art_x/content")]:
        response = client.request(method, path, headers=headers, json=JOB if method == "POST" else None)
        body = assert_problem(response, 401, None)
        assert body["code"] == ("missing_api_key" if header is None else "invalid_api_key")
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_unknown_route_is_problem_json(client: TestClient, auth: dict[str, str]) -> None:
    assert_problem(client.get("/v1/nothing-here", headers=auth), 404, None, "not_found")


def test_capabilities_list_what_the_server_runs(client: TestClient, auth: dict[str, str]) -> None:
    caps = client.get("/v1/capabilities", headers=auth).json()
    assert caps["methods"] == ["magnitude", "wanda", "sparsegpt"]
    assert "unstructured" in caps["patterns"]
    assert caps["allocations"] == ["uniform", "ecoflap-zeroth", "ecoflap-first", "owl", "alphapruning", "dlp"]
    assert caps["restorations"] == ["sparse-lora", "lora"]
    assert {"id": "builtin:wiki-en", "kind": "text"} in caps["datasets"]


def test_health_readiness_and_openapi(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": True, "broker": True}
    spec = client.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/events",
            "/v1/jobs/{job_id}/artifacts", "/v1/artifacts/{artifact_id}/content"} <= spec["paths"].keys()


def test_readyz_reports_an_unreachable_broker(settings: Settings) -> None:
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(down)) as client:
        ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"] == {"database": True, "broker": False}


def test_job_is_kept_when_the_broker_is_down(settings: Settings, auth: dict[str, str]) -> None:
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(down)) as client:
        response = client.post("/v1/jobs", json=JOB, headers=auth)
        assert response.status_code == 201
        events = client.get(f"/v1/jobs/{response.json()['id']}/events", headers=auth).json()["data"]
    assert response.json()["status"] == "queued"
    assert events[-1]["level"] == "warning" and "queue" in events[-1]["message"]


def test_revoked_key_is_refused(client: TestClient, settings: Settings, new_key: Any) -> None:
    from app.auth import revoke_key
    from prunekit.core.db.session import session_scope

    key = new_key("tenant-revoked")
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    with session_scope(settings) as session:
        assert revoke_key(session, key[:10]) == 1
    response = client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"})
    assert_problem(response, 401, None, "invalid_api_key")
