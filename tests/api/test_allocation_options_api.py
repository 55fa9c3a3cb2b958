"""allocation options through the API: alphapruning and dlp are accepted with their papers' defaults, and a
bad option is a 422 naming it."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

JOB = {"model": "local:tiny-llama", "method": "wanda", "sparsity": 0.7}


@pytest.mark.parametrize(("allocation", "options"), [
    ("alphapruning", {}), ("alphapruning", {"epsilon": 0.2, "granularity": "layer"}),
    ("dlp", {}), ("dlp", {"alpha": 0.1}),
    ("ecoflap-zeroth", {"perturbation": "block"}),
    ("ecoflap-zeroth", {"perturbation": "tensor", "granularity": "layer"}),
])
def test_new_allocations_and_options_are_accepted(client: TestClient, auth: dict[str, str], allocation: str,
                                                  options: dict[str, Any]) -> None:
    response = client.post("/v1/jobs", json={**JOB, "allocation": allocation, "allocation_options": options},
                           headers=auth)
    assert response.status_code == 201, response.text
    assert response.json()["request"]["allocation"] == allocation


@pytest.mark.parametrize(("options", "param"), [
    ({"perturbation": "block", "granularity": "layer"}, "allocation_options.perturbation"),
    ({"perturbation": "sphere"}, "allocation_options.perturbation"),
    ({"epsilon": 1.0}, "allocation_options.epsilon"),
    ({"epsilon": -0.1}, "allocation_options.epsilon"),
    ({"alpha": 0.5}, "allocation_options.alpha"),
])
def test_bad_options_are_a_422_naming_the_field(client: TestClient, auth: dict[str, str], options: dict[str, Any],
                                                param: str) -> None:
    response = client.post("/v1/jobs", json={**JOB, "allocation": "ecoflap-zeroth", "allocation_options": options},
                           headers=auth)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["param"] == param


def test_capabilities_list_the_allocations_and_their_defaults(client: TestClient, auth: dict[str, str]) -> None:
    caps = client.get("/v1/capabilities", headers=auth).json()
    assert {"alphapruning", "dlp"} <= set(caps["allocations"])
    options = caps["allocation_options"]
    assert options["perturbations"] == ["tensor", "block"]
    # perturbation, num_samples and seq_len: chosen per allocation and granularity (null: see docs/api.md)
    assert (options["defaults"]["epsilon"], options["defaults"]["alpha"], options["defaults"]["perturbation"]) == \
        (0.3, 0.15, None)
