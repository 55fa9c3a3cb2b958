"""Quality-budget jobs through the API (real Postgres and Redis, no worker): what is stored, and every refusal
with the field it names. The search itself: tests/unit/test_budget_search.py, tests/integration/test_budget_job.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from prunekit.core.config import Settings

BUDGET_JOB = {"model": "local:tiny-llama", "method": "wanda", "budget": {"max_perplexity_ratio": 1.5}}


def _post(client: TestClient, auth: dict[str, str], body: dict[str, Any]) -> Any:
    return client.post("/v1/jobs", json=body, headers=auth)


def test_a_budget_job_is_stored_with_its_defaults_and_no_sparsity(client: TestClient, auth: dict[str, str]) -> None:
    response = _post(client, auth, BUDGET_JOB)
    assert response.status_code == 201, response.text
    request = response.json()["request"]
    assert request["sparsity"] is None and request["sweep"] is None
    assert request["budget"] == {"max_perplexity_ratio": 1.5, "max_accuracy_drop": None, "min_sparsity": 0.1,
                                 "max_sparsity": 0.9, "step": 0.01}
    caps = client.get("/v1/capabilities", headers=auth).json()
    assert caps["budget"] == {"bounds": ["max_perplexity_ratio", "max_accuracy_drop"], "min_sparsity": 0.1,
                              "max_sparsity": 0.9, "step": 0.01}


@pytest.mark.parametrize(("changes", "param", "detail"), [
    ({"sparsity": 0.5}, "budget", "cannot be combined with sparsity"),
    ({"sweep": {"sparsities": [0.5, 0.6]}}, "budget", "cannot be combined with sweep"),
    ({"targets": {"language": 0.5}}, "budget", "cannot be combined with targets"),
    ({"pattern": "2:4"}, "budget", "pattern 2:4 fixes the sparsity; a budget has nothing to search"),
    ({"budget": {}}, "budget", "names exactly one bound"),
    ({"budget": {"max_perplexity_ratio": 1.5, "max_accuracy_drop": 0.1}}, "budget", "names exactly one bound"),
    ({"budget": {"max_perplexity_ratio": 1.0}}, "budget.max_perplexity_ratio", "greater than 1"),
    ({"budget": {"max_accuracy_drop": 1.0}}, "budget.max_accuracy_drop", "less than 1"),
    ({"budget": {"max_perplexity_ratio": 1.5, "step": 0.0001}}, "budget.step", "greater than or equal to 0.001"),
    ({"budget": {"max_perplexity_ratio": 1.5, "min_sparsity": 0.6, "max_sparsity": 0.5}}, "budget",
     "min_sparsity (0.6) is above max_sparsity (0.5)"),
    ({"budget": {"max_perplexity_ratio": 1.5, "extra": 1}}, "budget.extra", "Extra inputs are not permitted"),
    ({"evaluation": {"perplexity": False}}, "budget", "evaluation.perplexity must stay on"),
    ({"budget": {"max_accuracy_drop": 0.02}, "evaluation": {"accuracy": False}}, "budget",
     "evaluation.accuracy must stay on"),
    ({"allocation": "owl", "allocation_options": {"max_sparsity": 0.7}}, "budget",
     "budget.max_sparsity (0.9) is above allocation_options.max_sparsity (0.7)"),
])
def test_a_budget_that_cannot_run_is_refused_naming_the_field(client: TestClient, auth: dict[str, str],
                                                              changes: dict[str, Any], param: str,
                                                              detail: str) -> None:
    response = _post(client, auth, {**BUDGET_JOB, **changes})
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["code"] == "invalid_request" and problem["param"] == param
    assert detail in problem["detail"]


def test_neither_sparsity_nor_sweep_nor_budget_names_sparsity(client: TestClient, auth: dict[str, str]) -> None:
    response = _post(client, auth, {"model": "local:tiny-llama", "method": "wanda"})
    assert response.status_code == 422 and response.json()["param"] == "sparsity"
    assert "or a budget searches for one" in response.json()["detail"]


def test_the_bound_must_be_one_the_local_model_measures(client: TestClient, auth: dict[str, str],
                                                       settings: Settings) -> None:
    assert settings.models_root is not None
    (settings.models_root / "tiny-llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (settings.models_root / "tiny-clip").mkdir()
    (settings.models_root / "tiny-clip" / "config.json").write_text(json.dumps({"model_type": "clip"}))

    accuracy = _post(client, auth, {**BUDGET_JOB, "budget": {"max_accuracy_drop": 0.02}})
    assert accuracy.status_code == 422, accuracy.text
    assert accuracy.json()["param"] == "budget.max_accuracy_drop"
    assert "only CLIP-style models have" in accuracy.json()["detail"]

    perplexity = _post(client, auth, {**BUDGET_JOB, "model": "local:tiny-clip"})
    assert perplexity.status_code == 422, perplexity.text
    assert perplexity.json()["param"] == "budget.max_perplexity_ratio"

    # The bound each model does measure is accepted.
    assert _post(client, auth, BUDGET_JOB).status_code == 201
    assert _post(client, auth, {**BUDGET_JOB, "model": "local:tiny-clip",
                                "budget": {"max_accuracy_drop": 0.02}}).status_code == 201
