"""A model larger than the worker's memory budget, through the real service: the worker streams it from disk by
itself, says so, and publishes the pruned model in Hugging Face's sharded layout."""

from __future__ import annotations

import json
import secrets
import shutil
from pathlib import Path

from prunekit.models_root import smollm2_tokenizer
from tests.integration.conftest import start_service, stop_service
from tests.integration.test_job_flow import wait_until_ended
from workers.pruning import synthetic
from workers.pruning.weights_io import WeightFiles

BUDGET_MB = 50
SHARD_MB = 40


def test_a_model_over_the_workers_budget_is_streamed_and_written_in_shards(tmp_path: Path,
                                                                           models_root: Path) -> None:
    name = f"synth-{secrets.token_hex(3)}"
    written = synthetic.write_synthetic_llama(models_root / name, 5e7, synthetic.parse_dtype("float32"),
                                              smollm2_tokenizer(), seed=0)
    model_mb = sum(path.stat().st_size for path in written.files) / 2**20
    assert model_mb > 3 * BUDGET_MB  # about 190 MB of fp32 weights
    service = start_service({"QUEUE_NAME": f"prunekit-it-{secrets.token_hex(4)}",
                             "WORKER_MEMORY_BUDGET_MB": str(BUDGET_MB), "OUTPUT_SHARD_MB": str(SHARD_MB)},
                            tmp_path, models_root)
    try:
        http = service.http
        submitted = http.post("/v1/jobs", json={"model": f"local:{name}", "method": "wanda", "sparsity": 0.5,
                                                "calibration": {"num_samples": 4, "seq_len": 32},
                                                "evaluation": {"num_samples": 2, "seq_len": 32}})
        assert submitted.status_code == 201, submitted.text
        assert submitted.json()["request"]["offload"] is False  # the job asked for nothing: the worker chose
        job = wait_until_ended(http, submitted.json()["id"], service)
        assert job["status"] == "succeeded", f"{job['error']}{service.log_tail()}"

        memory = job["metrics"]["memory"]
        assert (memory["mode"], memory["chosen_by"], memory["budget_mb"]) == ("disk", "worker", BUDGET_MB)
        assert memory["model_mb"] > BUDGET_MB
        events = http.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        messages = [event["message"] for event in events]
        assert any(message.startswith("Streaming from disk") for message in messages), messages
        assert job["metrics"]["sparsity"]["achieved"] == 0.5
        assert job["metrics"]["perplexity"]["pruned"] is not None  # measured block by block

        names = {artifact["name"] for artifact in http.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]}
        shards = sorted(n for n in names if n.startswith("model-") and n.endswith(".safetensors"))
        assert len(shards) >= 4 and "model.safetensors.index.json" in names
        assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        # The published folder (the embedded store is a local folder) holds the pruned model, tensor for tensor in
        # the input's names and dtype: every decoder Linear keeps exactly half of each row's weights.
        index = next((tmp_path / "var" / "artifacts").rglob("model.safetensors.index.json"))
        weight_map = json.loads(index.read_text())["weight_map"]
        layer = "model.layers.1.mlp.down_proj.weight"
        with WeightFiles(models_root / name) as dense:
            assert set(weight_map) == set(dense.names())
            dtype = dense.info(layer).dtype
        with WeightFiles(index.parent) as pruned:
            weight = pruned.get(layer)
        assert weight.dtype == dtype
        assert ((weight == 0).sum(dim=1) == weight.shape[1] // 2).all()
    finally:
        stop_service(service)
        shutil.rmtree(models_root / name, ignore_errors=True)  # 190 MB in the session's shared models root
