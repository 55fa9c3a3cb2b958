"""Globally informed allocations through the real service (embedded stack: HTTP, a Celery worker, the store):
OWL and both ECoFLaP modes on a tiny Llama and a tiny CLIP, the score cache, and sweeps."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prunekit.fixtures.demo_models import TINY_BUILDERS
from tests.integration.conftest import Service, run_job, start_service, stop_service
from tests.integration.test_job_flow import download_artifacts
from workers.pruning.models import load_model, prunable_layers, weight_matrix
from workers.pruning.patterns import layer_prune_count, prune_count

SMALL = {"calibration": {"num_samples": 4, "seq_len": 32}, "evaluation": {"num_samples": 2, "seq_len": 32}}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[tuple[Service, str]]:
    clip = f"tiny-clip-{secrets.token_hex(3)}"
    TINY_BUILDERS["clip"](models_root / clip, 0)
    running = start_service({"QUEUE_NAME": f"prunekit-it-{secrets.token_hex(4)}"},
                            tmp_path_factory.mktemp("allocation"), models_root)
    try:
        yield running, clip
    finally:
        stop_service(running)


def _events(service: Service, job_id: str) -> list[dict[str, Any]]:
    return service.http.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]


def _check_model_follows_report(folder: Path, report: dict[str, Any], target: float) -> None:
    """Every pruned layer has round(s_l * size) zeros, floor(s_l * in) or one more per row, s_l the sparsity the
    allocation chose for it, and the chosen sparsities average to the target over the pruned weights."""
    chosen = {layer: group["sparsity"] for group in report["allocation"]["groups"]
              for layer in (group["name"],)}
    model = load_model(folder).model
    total = weighted = 0.0
    distinct = set()
    for name, layer in prunable_layers(model).items():
        weight = weight_matrix(layer)
        owner = next((g for g in chosen if name == g or name.startswith(f"{g}.")), None)
        if owner is None:
            continue  # a tower outside the plan
        sparsity = chosen[owner]
        distinct.add(round(sparsity, 9))
        zeros = (weight == 0).sum(dim=1)
        floor = prune_count(sparsity, weight.shape[1])  # floor or one more per row, the nearest total
        assert ((zeros == floor) | (zeros == floor + 1)).all(), (name, sparsity)
        assert int(zeros.sum()) == layer_prune_count(sparsity, *weight.shape), (name, sparsity)
        total += weight.numel()
        weighted += weight.numel() * sparsity
    assert weighted / total == pytest.approx(target, abs=1e-9)
    assert len(distinct) > 1, "a non-uniform allocation gave every group the same sparsity"


@pytest.mark.parametrize("allocation", ["ecoflap-zeroth", "ecoflap-first", "owl"])
def test_allocation_on_tiny_llama_prunes_each_block_at_its_own_ratio(service: tuple[Service, str], tmp_path: Path,
                                                                    allocation: str) -> None:
    running, _ = service
    job = run_job(running, {"model": "local:tiny-llama", "method": "wanda", "sparsity": 0.6, "allocation": allocation,
                         "allocation_options": {"num_samples": 2, "granularity": "layer"}, **SMALL})
    assert job["request"]["allocation_options"]["granularity"] == "layer"
    info = job["metrics"]["allocation"]
    assert info["name"] == allocation and info["per_tower"] == {"language": pytest.approx(0.6, abs=1e-6)}
    assert "scoring" in job["metrics"]["timings_s"]
    download_artifacts(running.http, job["id"], tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    _check_model_follows_report(tmp_path, report, 0.6)
    if allocation != "owl":
        assert max(group["sparsity"] for group in report["allocation"]["groups"]) <= 0.7 + 1e-9


@pytest.mark.parametrize("allocation", ["ecoflap-zeroth", "ecoflap-first", "owl"])
def test_allocation_on_tiny_clip_is_joint_across_the_towers(service: tuple[Service, str], tmp_path: Path,
                                                           allocation: str) -> None:
    running, clip = service
    job = run_job(running, {"model": f"local:{clip}", "method": "wanda", "sparsity": 0.5, "allocation": allocation,
                         "allocation_options": {"num_samples": 16},
                         "calibration": {"dataset": "builtin:digits", "num_samples": 16}})
    chosen = job["metrics"]["allocation"]["per_tower"]
    assert set(chosen) == {"vision", "language"}
    download_artifacts(running.http, job["id"], tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert {group["tower"] for group in report["allocation"]["groups"]} == {"vision", "language"}
    _check_model_follows_report(tmp_path, report, 0.5)
    assert set(job["metrics"]["accuracy"]) == {"dense", "pruned"}


def test_per_tower_targets_are_each_met_by_their_own_allocation(service: tuple[Service, str]) -> None:
    running, clip = service
    job = run_job(running, {"model": f"local:{clip}", "method": "wanda", "sparsity": 0.5, "allocation": "owl",
                         "targets": {"vision": 0.4, "language": 0.6},
                         "calibration": {"dataset": "builtin:digits", "num_samples": 16}})
    assert job["metrics"]["allocation"]["per_tower"] == {"vision": pytest.approx(0.4, abs=1e-6),
                                                         "language": pytest.approx(0.6, abs=1e-6)}


def test_a_second_job_with_the_same_scoring_options_uses_the_cached_scores(service: tuple[Service, str],
                                                                           tmp_path: Path) -> None:
    running, _ = service
    options = {"num_samples": 2, "eps": 0.002}
    body = {"model": "local:tiny-llama", "method": "wanda", "allocation": "ecoflap-zeroth",
            "allocation_options": options, **SMALL}
    first = run_job(running, {**body, "sparsity": 0.5})
    second = run_job(running, {**body, "sparsity": 0.7, "method": "sparsegpt"})
    assert first["metrics"]["allocation"]["cache"] == "miss"
    assert second["metrics"]["allocation"]["cache"] == "hit"
    assert second["metrics"]["allocation"]["scoring_s"] == 0.0
    messages = [event["message"] for event in _events(running, second["id"])]
    assert any("cached" in message for message in messages), messages
    assert not any(message.startswith("Scored ") for message in messages)  # no scoring pass ran
    reports = []
    for job in (first, second):
        download_artifacts(running.http, job["id"], tmp_path / job["id"])
        reports.append(json.loads((tmp_path / job["id"] / "report.json").read_text()))
    scores = [{g["name"]: g["score"] for g in report["allocation"]["groups"]} for report in reports]
    assert scores[0] == scores[1]
    # Another seed is another set of directions: scored afresh.
    third = run_job(running, {**body, "sparsity": 0.5, "calibration": {**SMALL["calibration"], "seed": 1}})
    assert third["metrics"]["allocation"]["cache"] == "miss"


def test_a_sweep_gives_one_model_and_one_metrics_row_per_sparsity(service: tuple[Service, str],
                                                                 tmp_path: Path) -> None:
    running, _ = service
    job = run_job(running, {"model": "local:tiny-llama", "method": "wanda", "allocation": "ecoflap-first",
                         "allocation_options": {"num_samples": 2}, "sweep": {"sparsities": [0.6, 0.3]}, **SMALL})
    assert job["request"]["sparsity"] == 0.3 and job["request"]["sweep"]["sparsities"] == [0.3, 0.6]
    rows = job["metrics"]["sweep"]
    assert [row["sparsity"] for row in rows] == [0.3, 0.6]
    assert all(set(row["perplexity"] if isinstance(row["perplexity"], dict) else {}) == set() for row in rows)
    assert rows[0]["perplexity"] <= rows[1]["perplexity"] * 1.05  # sparser is not better, give or take noise
    assert job["metrics"]["sparsity"]["achieved"] == rows[0]["achieved"]
    events = _events(running, job["id"])
    assert sum(1 for e in events if e["message"].startswith("Scoring")) == 1  # one scoring pass for both
    artifacts = download_artifacts(running.http, job["id"], tmp_path)
    names = {artifact["name"] for artifact in artifacts}
    assert {"sparsity-0.3/model.safetensors", "sparsity-0.6/model.safetensors", "sparsity-0.3/config.json",
            "report.json"} <= names
    report = json.loads((tmp_path / "report.json").read_text())
    assert [row["sparsity"] for row in report["sweep"]] == [0.3, 0.6]
    for row in rows:
        groups = report["allocation"]["groups_per_sparsity"][f"{row['sparsity']:g}"]
        _check_model_follows_report(tmp_path / row["folder"], {"allocation": {"groups": groups}}, row["sparsity"])
