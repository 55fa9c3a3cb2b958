"""What the contract fuzzing found (tests/api/test_contract.py), each pinned by a plain request: answers that were
500s, 405s that named only some of a path's methods, and requests the schema and the server judged differently."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.schemas import JobCreate

JOB = {"model": "local:tiny-llama", "method": "wanda", "sparsity": 0.5}


def problem(response: Any, status: int, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert response.headers["content-type"] == "application/problem+json" and body.get("param") == param, body
    return body


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_null_sparsity_with_an_nm_pattern_is_a_422_not_a_500(client: TestClient, auth: dict[str, str],
                                                             pattern: str) -> None:
    body = {**JOB, "pattern": pattern, "sparsity": None}
    problem(client.post("/v1/jobs", json=body, headers=auth), 422, "sparsity")


@pytest.mark.parametrize(("path", "param"), [("/v1/jobs?after=%00", "after"), ("/v1/datasets?after=%00", "after"),
                                             ("/v1/jobs?after=not-an-id", "after")])
def test_cursors_are_ids(client: TestClient, auth: dict[str, str], path: str, param: str) -> None:
    problem(client.get(path, headers=auth), 422, param)


def test_event_cursors_beyond_a_bigint_are_refused(client: TestClient, auth: dict[str, str]) -> None:
    job = client.post("/v1/jobs", json=JOB, headers=auth).json()
    problem(client.get(f"/v1/jobs/{job['id']}/events?after={2**63}", headers=auth), 422, "after")
    problem(client.get(f"/v1/jobs/{job['id']}/events/stream?after={2**63}", headers=auth), 422, "after")


def test_a_last_event_id_that_is_no_event_id_is_ignored(client: TestClient, auth: dict[str, str]) -> None:
    job = client.post("/v1/jobs", json=JOB, headers=auth).json()
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)  # an ended job's stream ends by itself
    for last in ["²".encode("latin-1"), str(2**64).encode(), b"12x"]:  # "²".isdigit() is true; int() refuses it
        response = client.get(f"/v1/jobs/{job['id']}/events/stream", headers={**auth, "Last-Event-ID": last})
        assert response.status_code == 200 and "event: end" in response.text, (last, response.text)


@pytest.mark.parametrize("path", ["/v1/jobs/%00", "/v1/jobs/job_x/events", "/v1/datasets/%00",
                                  "/v1/artifacts/art_%00/content"])
def test_an_id_of_another_shape_is_not_found(client: TestClient, auth: dict[str, str], path: str) -> None:
    problem(client.get(path, headers=auth), 404, "id")


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("OPTIONS", "/v1/jobs", "GET, POST"), ("PUT", "/v1/jobs", "GET, POST"),
    ("PATCH", "/v1/datasets", "GET, POST"), ("PUT", "/v1/datasets/ds_x", "GET, DELETE"),
    ("DELETE", "/v1/jobs/job_x", "GET"), ("GET", "/v1/jobs/job_x/cancel", "POST"),
    ("POST", "/dashboard/index.html", "GET, HEAD"),
])
def test_405_lists_every_method_of_the_path(client: TestClient, auth: dict[str, str], method: str, path: str,
                                            allow: str) -> None:
    response = client.request(method, path, headers=auth)
    assert response.status_code == 405 and response.headers["allow"] == allow
    assert response.json()["code"] == "method_not_allowed"


def test_dataset_names_hold_no_nul(client: TestClient, auth: dict[str, str]) -> None:
    text = {"file": ("data.txt", b"one line\n", "text/plain")}
    problem(client.post("/v1/datasets", files=text, data={"name": "a\x00b"}, headers=auth), 422, "name")
    # Written by hand: HTTP clients escape a NUL in a file name, a hand-made request need not.
    body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a\x00.txt"\r\n\r\none line\n\r\n'
            b"--b--\r\n")
    multipart = {**auth, "Content-Type": "multipart/form-data; boundary=b"}
    problem(client.post("/v1/datasets", content=body, headers=multipart), 422, "file")
    long_name = "n" * 300 + ".txt"
    created = client.post("/v1/datasets", files={"file": (long_name, b"one line\n")}, headers=auth)
    assert created.status_code == 201 and created.json()["name"] == long_name[:255]


@pytest.mark.parametrize("model", ["local:tiny-llama\n", "hf:org/na..me", "hf:org/name@v..1"])
def test_model_references_the_schema_refuses_are_refused(client: TestClient, auth: dict[str, str],
                                                          model: str) -> None:
    # `$` let a trailing newline through re.match; `..` was only refused in local: and s3: references.
    problem(client.post("/v1/jobs", json={**JOB, "model": model}, headers=auth), 422, "model")
    published = JobCreate.model_json_schema()["properties"]["model"]
    assert not re.search(published["pattern"].replace("$", r"\Z"), model) or ".." in model


def test_the_webhook_url_length_is_counted_as_sent(client: TestClient, auth: dict[str, str]) -> None:
    # 2000 characters as sent are allowed (the schema's maxLength), though the parsed URL adds a slash.
    url = "https://example.com?" + "q" * (2000 - len("https://example.com?"))
    assert client.post("/v1/jobs", json={**JOB, "webhook": {"url": url}}, headers=auth).status_code == 201
    problem(client.post("/v1/jobs", json={**JOB, "webhook": {"url": url + "q"}}, headers=auth), 422, "webhook.url")


def test_the_document_states_the_refusals_and_links(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    create = document["paths"]["/v1/jobs"]["post"]
    assert {r["code"] for r in create["responses"]["422"]["x-refusals"]} >= {"unknown_model", "dataset_not_found"}
    links = create["responses"]["201"]["links"]
    assert links["GetJob"]["parameters"] == {"job_id": "$response.body#/id"} and "CancelJob" in links
    upload = document["paths"]["/v1/datasets"]["post"]["responses"]["201"]["links"]
    assert {"GetDataset", "DeleteDataset"} <= set(upload)
    assert create["security"] == [{"bearerAuth": []}] and "security" not in document["paths"]["/healthz"]["get"]
