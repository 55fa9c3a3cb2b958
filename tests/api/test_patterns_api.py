"""N:M patterns through the API: they fix the sparsity, so any other value is a 422 naming `sparsity`."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

JOB = {"model": "local:tiny-llama", "method": "sparsegpt", "sparsity": 0.5}


@pytest.mark.parametrize(("pattern", "sparsity"), [("2:4", 0.6), ("4:8", 0.3), ("2:4", 0.75)])
def test_nm_pattern_with_another_sparsity_is_refused(client: TestClient, auth: dict[str, str], pattern: str,
                                                     sparsity: float) -> None:
    response = client.post("/v1/jobs", json={**JOB, "pattern": pattern, "sparsity": sparsity}, headers=auth)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["code"] == "invalid_request" and body["param"] == "sparsity"
    assert body["detail"] == f"sparsity: pattern {pattern} fixes sparsity at 0.5"
    assert body["errors"] == [{"param": "sparsity", "detail": f"pattern {pattern} fixes sparsity at 0.5"}]


def test_out_of_range_sparsity_with_a_pattern_keeps_the_range_error(client: TestClient,
                                                                    auth: dict[str, str]) -> None:
    response = client.post("/v1/jobs", json={**JOB, "pattern": "2:4", "sparsity": 1.5}, headers=auth)
    assert response.status_code == 422 and response.json()["param"] == "sparsity"
    assert "fixes sparsity" not in response.json()["detail"]


@pytest.mark.parametrize(("method", "pattern"), [("sparsegpt", "2:4"), ("sparsegpt", "4:8"), ("wanda", "2:4"),
                                                 ("magnitude", "4:8"), ("sparsegpt", "unstructured")])
def test_supported_method_and_pattern_are_accepted(client: TestClient, auth: dict[str, str], method: str,
                                                   pattern: str) -> None:
    request: dict[str, Any] = {**JOB, "method": method, "pattern": pattern}
    response = client.post("/v1/jobs", json=request, headers=auth)
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["status"] == "queued"
    assert (job["request"]["method"], job["request"]["pattern"], job["request"]["sparsity"]) == (method, pattern, 0.5)


def test_capabilities_list_the_patterns_and_sparsegpt(client: TestClient, auth: dict[str, str]) -> None:
    caps = client.get("/v1/capabilities", headers=auth).json()
    assert caps["patterns"] == ["unstructured", "2:4", "4:8"] and "sparsegpt" in caps["methods"]
