"""Quality-budget jobs through the real service (embedded stack: HTTP, a Celery worker, the store) on the tiny
Llama: the sparsity a budget job chooses is checked against a sweep of the same model at it and one step above,
and a budget no sparsity keeps fails readably.

The tiny Llama has random weights: its perplexity sits near its vocabulary's size and moves by about a percent
from 30% to 80% sparsity, so the bound is tight (1.005x); what matters here is that it cuts the range."""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Service, run_job, start_service, stop_service
from tests.integration.test_job_flow import wait_until_ended

SMALL = {"calibration": {"num_samples": 4, "seq_len": 32}, "evaluation": {"num_samples": 2, "seq_len": 32}}
BOUND = 1.005
STEP = 0.01
BUDGET = {"max_perplexity_ratio": BOUND, "min_sparsity": 0.3, "max_sparsity": 0.8, "step": STEP}
GRID_POINTS = 51  # 0.3 to 0.8 by 0.01


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[Service]:
    running = start_service({"QUEUE_NAME": f"prunekit-it-{secrets.token_hex(4)}"}, tmp_path_factory.mktemp("budget"),
                            models_root)
    try:
        yield running
    finally:
        stop_service(running)


def _artifacts(service: Service, job_id: str) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in service.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}


def test_the_chosen_sparsity_is_the_edge_a_sweep_of_the_same_model_confirms(service: Service) -> None:
    job = run_job(service, {"model": "local:tiny-llama", "method": "wanda", "budget": BUDGET, **SMALL})
    metrics, budget = job["metrics"], job["metrics"]["budget"]
    chosen = budget["chosen_sparsity"]
    assert job["request"]["sparsity"] is None
    assert budget["metric"] == "perplexity" and budget["bound"] == {"max_perplexity_ratio": BOUND}
    assert budget["range"]["num_points"] == GRID_POINTS
    assert 0.3 <= chosen < 0.8, f"the bound no longer cuts the range: {budget['probes']}"
    # Bisection: at most ceil(log2(51 + 1)) = 6 probes; the chosen sparsity was probed within, the next outside.
    assert budget["num_probes"] == len(budget["probes"]) <= math.ceil(math.log2(GRID_POINTS + 1)) == 6
    probes = {p["sparsity"]: p for p in budget["probes"]}
    above = round(chosen + STEP, 6)
    assert probes[chosen]["within"] and not probes[above]["within"]
    # The artifacts and the top-level metrics are the chosen model's.
    assert metrics["sparsity"]["target"] == chosen
    assert metrics["sparsity"]["achieved"] == pytest.approx(chosen, abs=0.005)
    assert metrics["perplexity"] == {"dense": budget["dense"], "pruned": probes[chosen]["perplexity"]}
    assert "budget_search" in metrics["timings_s"]
    events = service.http.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
    verdicts = [e["message"] for e in events
                if (e["data"] or {}).get("stage") == "budget_search" and e["message"].startswith("Probe ")]
    assert len(verdicts) == budget["num_probes"], verdicts
    assert f"sparsity {chosen:g}: perplexity" in "\n".join(verdicts)

    # A sweep of the same model, calibration and evaluation at the chosen sparsity and one step above: the same
    # windows and seed give the same numbers, so the edge holds there too, and the models are the same bytes.
    sweep = run_job(service, {"model": "local:tiny-llama", "method": "wanda", "sweep": {"sparsities": [chosen, above]},
                              **SMALL})
    rows = {row["sparsity"]: row for row in sweep["metrics"]["sweep"]}
    dense = sweep["metrics"]["perplexity"]["dense"]
    assert dense == budget["dense"]
    assert rows[chosen]["perplexity"] / dense <= BOUND < rows[above]["perplexity"] / dense
    assert [rows[s]["perplexity"] for s in (chosen, above)] == [probes[s]["perplexity"] for s in (chosen, above)]
    chosen_model = _artifacts(service, job["id"])["model.safetensors"]
    swept_model = _artifacts(service, sweep["id"])[f"{rows[chosen]['folder']}/model.safetensors"]
    assert chosen_model["sha256"] == swept_model["sha256"]


def test_a_budget_that_no_sparsity_keeps_fails_naming_the_bound_and_the_best_probe(service: Service) -> None:
    body = {"model": "local:tiny-llama", "method": "wanda", **SMALL,
            "budget": {"max_perplexity_ratio": 1.0001, "min_sparsity": 0.85, "max_sparsity": 0.9, "step": 0.05}}
    submitted = service.http.post("/v1/jobs", json=body)
    assert submitted.status_code == 201, submitted.text
    job = wait_until_ended(service.http, submitted.json()["id"], service)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "budget_unreachable"
    message = job["error"]["message"]
    assert message.startswith("No sparsity from 0.85 to 0.9 keeps the perplexity at most 1.0001x the dense model's")
    assert "the best probe, at sparsity 0.85, has perplexity" in message
    assert _artifacts(service, job["id"]) == {}  # no model that breaks the bound is delivered
