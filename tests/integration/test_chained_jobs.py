"""Chained jobs on the real service, both stacks: a tiny Llama uploaded through the models API is pruned
in a sweep; one of the sweep's models (job:<id>/sparsity-<s>) is pruned further by a second job, whose report names
its parent and whose model keeps every zero the parent made. A model the worker cannot load is marked failed."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

from safetensors.numpy import load_file

from tests.integration.conftest import Service, run_job
from tests.integration.test_job_flow import download_artifacts, wait_until_ended

SMALL = {"calibration": {"num_samples": 8, "seq_len": 64}, "evaluation": {"num_samples": 4, "seq_len": 64}}


def upload_model(service: Service, files: dict[str, bytes]) -> dict[str, object]:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(f"tiny/{name}", data)
    created = service.http.post("/v1/models", files={"file": ("tiny.zip", buffer.getvalue())})
    assert created.status_code == 201, created.text
    return created.json()


def test_a_sweep_model_is_pruned_further_by_a_chained_job(service: Service, tmp_path: Path) -> None:
    folder = service.models_root / "tiny-llama"
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    model = upload_model(service, files)

    first = run_job(service, {"model": model["id"], "method": "magnitude", "sweep": {"sparsities": [0.3, 0.5]},
                              **SMALL})
    whole = service.http.post("/v1/jobs", json={"model": f"job:{first['id']}", "method": "wanda", "sparsity": 0.7})
    assert whole.json()["code"] == "unknown_model" and f"job:{first['id']}/sparsity-0.5" in whole.json()["detail"]

    second = run_job(service, {"model": f"job:{first['id']}/sparsity-0.5", "method": "wanda", "sparsity": 0.7,
                               **SMALL})
    assert abs(second["metrics"]["sparsity"]["achieved"] - 0.7) < 0.01

    parent_files = download_artifacts(service.http, first["id"], tmp_path / "first")
    assert any(a["name"] == "sparsity-0.5/model.safetensors" for a in parent_files)
    download_artifacts(service.http, second["id"], tmp_path / "second")
    report = json.loads((tmp_path / "second" / "report.json").read_text())
    assert report["parent"] == {"job": first["id"], "sparsity": 0.5, "model": f"job:{first['id']}/sparsity-0.5"}
    assert report["model"]["ref"] == f"job:{first['id']}/sparsity-0.5"
    first_report = json.loads((tmp_path / "first" / "report.json").read_text())
    assert first_report["model"]["ref"] == model["id"] and "parent" not in first_report

    # Pruning further keeps every zero of the parent: what was pruned at 0.5 stays pruned at 0.7.
    parent = load_file(tmp_path / "first" / "sparsity-0.5" / "model.safetensors")
    child = load_file(tmp_path / "second" / "model.safetensors")
    pruned = [name for name in parent if name.endswith("proj.weight")]
    assert pruned
    for name in pruned:
        assert not child[name][parent[name] == 0].any(), name
        assert (child[name] == 0).mean() > (parent[name] == 0).mean() + 0.1, name


def test_a_model_the_worker_cannot_load_is_marked_failed(service: Service) -> None:
    folder = service.models_root / "tiny-llama"
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    # Passes every check the API makes without transformers, yet the loader refuses it: an unknown activation.
    config = json.loads(files["config.json"])
    config["hidden_act"] = "no-such-activation"
    model = upload_model(service, {**files, "config.json": json.dumps(config).encode()})
    submitted = service.http.post("/v1/jobs", json={"model": model["id"], "method": "magnitude", "sparsity": 0.5,
                                                    **SMALL})
    job = wait_until_ended(service.http, submitted.json()["id"], service)
    assert job["status"] == "failed" and job["error"]["code"] in ("model_load_failed", "invalid_model"), job
    now = service.http.get(f"/v1/models/{model['id']}").json()
    assert (now["status"], now["ready"], now["error"]["code"]) == ("failed", False, job["error"]["code"])
    again = service.http.post("/v1/jobs", json={"model": model["id"], "method": "magnitude", "sparsity": 0.5})
    assert (again.status_code, again.json()["code"], again.json()["param"]) == (422, "model_not_ready", "model")
