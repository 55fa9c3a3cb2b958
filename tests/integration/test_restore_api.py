"""SparseLoRA restoration through the real service (embedded stack: HTTP, a Celery worker, the store): the job
trains after pruning, reports its losses, and the downloaded model has exactly the pruned zeros."""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Service, run_job, start_service, stop_service
from tests.integration.test_job_flow import download_artifacts
from workers.pruning.data import BUILTIN_WIKI_EN, load_text
from workers.pruning.models import load_model, prunable_layers, weight_matrix
from workers.pruning.patterns import prune_count

SMALL = {"calibration": {"num_samples": 4, "seq_len": 32}, "evaluation": {"num_samples": 2, "seq_len": 32}}
JOB = {"model": "local:tiny-llama", "method": "wanda", "sparsity": 0.5, **SMALL}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[Service]:
    running = start_service({"QUEUE_NAME": f"prunekit-it-{secrets.token_hex(4)}"},
                            tmp_path_factory.mktemp("restore"), models_root)
    try:
        yield running
    finally:
        stop_service(running)


def _zeros(folder: Path) -> dict[str, Any]:
    return {name: weight_matrix(layer) == 0 for name, layer in prunable_layers(load_model(folder).model).items()}


def test_sparse_lora_job_trains_and_keeps_exactly_the_pruned_zeros(service: Service, tmp_path: Path) -> None:
    plain = run_job(service, JOB)
    job = run_job(service, {**JOB, "restore": {"method": "sparse-lora", "steps": 20, "rank": 4, "lr": 1e-3,
                                            "warmup_steps": 0.1}})
    assert job["request"]["restore"]["distill"] == 0.1  # defaults filled in

    info = job["metrics"]["restore"]
    assert info["method"] == "sparse-lora" and info["steps"] == 20 and info["warmup_steps"] == 2
    assert info["mask_preserved"] is True
    assert all(math.isfinite(info[key]) for key in ("loss_first", "loss_last", "seconds"))
    assert len(info["losses"]) == 20 and info["losses"][0] == info["loss_first"]
    assert info["perplexity_before"] == plain["metrics"]["perplexity"]["pruned"]
    assert job["metrics"]["perplexity"]["pruned"] != info["perplexity_before"]  # measured after restoration
    assert info["sparsity_after_merge"] == job["metrics"]["sparsity"]["achieved"] == plain["metrics"]["sparsity"][
        "achieved"]
    assert "restoring" in job["metrics"]["timings_s"]
    events = service.http.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
    steps = [e for e in events if e["type"] == "progress" and e["data"]["stage"] == "restoring" and e["data"]["done"]]
    assert len(steps) == 20 and "loss" in steps[-1]["message"] and steps[-1]["data"]["total"] == 20

    download_artifacts(service.http, plain["id"], tmp_path / "plain")
    download_artifacts(service.http, job["id"], tmp_path / "restored")
    restored, pruned = _zeros(tmp_path / "restored"), _zeros(tmp_path / "plain")
    assert restored.keys() == pruned.keys() and restored
    for name, zeros in restored.items():
        assert (zeros.sum(dim=1) == prune_count(0.5, zeros.shape[1])).all(), name  # floor(s * in) per row
        assert (zeros == pruned[name]).all(), name  # the very zeros pruning chose
    report = json.loads((tmp_path / "restored" / "report.json").read_text())
    assert report["restore"]["mask_preserved"] is True and report["spec"]["restore"]["steps"] == 20


def test_plain_lora_reports_the_sparsity_it_lost_and_uploads_restore_on_their_dataset(service: Service,
                                                                                   tmp_path: Path) -> None:
    text = load_text(BUILTIN_WIKI_EN)[:20_000].encode()
    uploaded = service.http.post("/v1/datasets", files={"file": ("domain.txt", text, "text/plain")})
    assert uploaded.status_code == 201, uploaded.text
    ds = uploaded.json()["id"]
    job = run_job(service, {**JOB, "restore": {"method": "lora", "steps": 3, "rank": 2, "dataset": ds}})
    info = job["metrics"]["restore"]
    assert info["mask_preserved"] is False and info["sparsity_before_merge"] == 0.5
    assert info["sparsity_after_merge"] == job["metrics"]["sparsity"]["achieved"] < 0.01
    download_artifacts(service.http, job["id"], tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["data"]["restore"]["dataset"] == ds and report["spec"]["restore"]["dataset"] == ds


def test_calibration_and_restore_on_two_uploads_each_use_their_own(service: Service) -> None:
    """Both uploads are stored as data.txt; the worker once fetched them to one path, so the restore set silently
    replaced the calibration set and the pruned model (hence perplexity_before) changed."""
    text = load_text(BUILTIN_WIKI_EN)
    ids = []
    for part in (text[:20_000], text[40_000:60_000]):
        uploaded = service.http.post("/v1/datasets", files={"file": ("part.txt", part.encode(), "text/plain")})
        assert uploaded.status_code == 201, uploaded.text
        ids.append(uploaded.json()["id"])
    calibration = {**SMALL["calibration"], "dataset": ids[0]}
    plain = run_job(service, {**JOB, "calibration": calibration})
    job = run_job(service, {**JOB, "calibration": calibration,
                            "restore": {"method": "sparse-lora", "steps": 2, "rank": 2, "dataset": ids[1]}})
    assert job["metrics"]["restore"]["perplexity_before"] == plain["metrics"]["perplexity"]["pruned"]
