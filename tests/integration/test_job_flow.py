"""A job end to end over real HTTP, a real worker process and a real store, on both stacks:
Postgres + Redis + S3 (moto server), and the embedded defaults (SQLite, SQLite broker, local folder)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.integration.conftest import Service

SMALL = {"calibration": {"num_samples": 8, "seq_len": 64}, "evaluation": {"num_samples": 4, "seq_len": 64}}
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def wait_until_ended(http: httpx.Client, job_id: str, service: Service, timeout_s: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        for name, proc in service.processes.items():
            assert proc.poll() is None, f"the {name} process exited{service.log_tail()}"
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout_s} s{service.log_tail()}")


def download_artifacts(http: httpx.Client, job_id: str, dest: Path) -> list[dict[str, Any]]:
    artifacts = http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    for artifact in artifacts:
        content = http.get(f"/v1/artifacts/{artifact['id']}/content")
        assert content.status_code == 200, content.text
        assert len(content.content) == artifact["size_bytes"]
        assert hashlib.sha256(content.content).hexdigest() == artifact["sha256"]
        path = dest / artifact["name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.content)
    return artifacts


def test_wanda_job_prunes_every_decoder_linear_exactly(service: Service, tmp_path: Path) -> None:
    http = service.http
    submitted = http.post("/v1/jobs", json={"model": "local:tiny-llama", "method": "wanda", "sparsity": 0.5,
                                            **SMALL, "metadata": {"stack": service.env["STACK"]}})
    assert submitted.status_code == 201, submitted.text
    job = wait_until_ended(http, submitted.json()["id"], service)
    assert job["status"] == "succeeded", f"{job['error']}{service.log_tail()}"
    assert job["started_at"] <= job["finished_at"] and job["progress"]["fraction"] == 1.0

    artifacts = download_artifacts(http, job["id"], tmp_path / "model")
    names = {a["name"] for a in artifacts}
    assert {"config.json", "model.safetensors", "report.json", "tokenizer.json"} <= names

    weights = load_file(tmp_path / "model" / "model.safetensors")
    pruned = {n: w for n, w in weights.items() if n.endswith(".weight") and n.split(".")[-2] in DECODER_LINEARS}
    assert len(pruned) == 7 * AutoModelForCausalLM.from_pretrained(tmp_path / "model").config.num_hidden_layers
    for name, weight in pruned.items():
        # Wanda compares weights within each output row: every row loses exactly floor(0.5 * in) weights.
        zeros_per_row = (weight == 0).sum(dim=1)
        assert torch.all(zeros_per_row == math.floor(0.5 * weight.shape[1])), name
    assert (weights["model.embed_tokens.weight"] == 0).float().mean() < 0.01

    metrics = job["metrics"]
    assert metrics["sparsity"]["target"] == 0.5 and abs(metrics["sparsity"]["achieved"] - 0.5) < 1e-3
    assert set(metrics["sparsity"]["per_layer"]) == {n.removesuffix(".weight") for n in pruned}
    assert math.isfinite(metrics["perplexity"]["dense"]) and math.isfinite(metrics["perplexity"]["pruned"])
    report = json.loads((tmp_path / "model" / "report.json").read_text())
    assert report["sparsity"] == metrics["sparsity"]

    # The saved folder is a plain HF model: it loads and runs with the zeros in place.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight == 0,
                       weights["model.layers.0.mlp.up_proj.weight"] == 0)
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()

    events = http.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
    pruning = [e["data"] for e in events if e["type"] == "progress" and e["data"]["stage"] == "pruning"]
    assert pruning and pruning[-1]["done"] == pruning[-1]["total"] == model.config.num_hidden_layers
    assert events[-1]["data"]["status"] == "succeeded"

    # The worker's logs are JSON lines that carry the job id.
    lines = [json.loads(line) for line in (service.logs / "worker.log").read_text().splitlines()
             if line.startswith("{")]
    assert any(entry.get("job_id") == job["id"] and entry["message"] == "job started" for entry in lines)


def test_unloadable_model_fails_readably_and_the_worker_serves_the_next_job(service: Service) -> None:
    broken = f"broken-{secrets.token_hex(3)}"
    folder = service.models_root / broken
    folder.mkdir()
    (folder / "config.json").write_text("{this is not json")
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    http = service.http
    bad = http.post("/v1/jobs", json={"model": f"local:{broken}", "method": "magnitude", "sparsity": 0.3, **SMALL})
    good = http.post("/v1/jobs", json={"model": "local:tiny-llama", "method": "magnitude", "sparsity": 0.3,
                                       **SMALL, "evaluation": {"perplexity": False}})
    assert bad.status_code == good.status_code == 201

    failed = wait_until_ended(http, bad.json()["id"], service)
    assert failed["status"] == "failed" and failed["metrics"] is None
    assert failed["error"]["code"] == "model_load_failed"
    assert "config.json" in failed["error"]["message"] or broken in failed["error"]["message"]
    assert "Traceback" not in failed["error"]["message"]
    assert http.get(f"/v1/jobs/{failed['id']}/artifacts").json()["data"] == []

    succeeded = wait_until_ended(http, good.json()["id"], service)
    assert succeeded["status"] == "succeeded", succeeded["error"]
    assert "perplexity" not in succeeded["metrics"]
    assert service.processes["worker"].poll() is None, "the worker process died"


class Receiver:
    """A webhook endpoint on loopback that fails its first delivery, then accepts."""

    def __init__(self, failures: int = 1) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.failures = failures
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(500 if len(receiver.requests) <= receiver.failures else 204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/prunekit"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_failed_job_webhook_is_signed_and_retried(service: Service) -> None:
    receiver = Receiver(failures=1)
    http = service.http
    secret = http.get("/v1/webhooks/secret").json()["secret"]
    broken = service.models_root / f"weights-missing-{secrets.token_hex(3)}"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    job = http.post("/v1/jobs", json={"model": f"local:{broken.name}", "method": "wanda", "sparsity": 0.5,
                                      "webhook": {"url": receiver.url}})
    assert job.status_code == 201, job.text
    ended = wait_until_ended(http, job.json()["id"], service)
    assert ended["status"] == "failed"
    deadline = time.monotonic() + 60
    while len(receiver.requests) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    receiver.server.shutdown()
    assert len(receiver.requests) == 2, f"{len(receiver.requests)} deliveries{service.log_tail()}"

    headers, body = receiver.requests[-1]
    payload = json.loads(body)
    assert payload["type"] == f"pruning.job.{ended['status']}" and payload["data"]["id"] == ended["id"]
    # Verified as a receiver would, from the Standard Webhooks definition.
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected}"
    assert receiver.requests[0][0]["webhook-id"] == headers["webhook-id"]  # the retry is the same message

    events = http.get(f"/v1/jobs/{ended['id']}/events", params={"limit": 1000}).json()["data"]
    attempts = [e["data"]["webhook"] for e in events if e["data"] and "webhook" in e["data"]]
    assert [(a["attempt"], a["ok"]) for a in attempts] == [(1, False), (2, True)]


def test_job_calibrates_on_an_uploaded_dataset(service: Service, tmp_path: Path) -> None:
    from workers.pruning.data import BUILTIN_WIKI_EN, load_text

    text = load_text(BUILTIN_WIKI_EN)[:40_000]
    lines = [json.dumps({"text": para}) for para in text.split("\n\n") if para.strip()]
    http = service.http
    uploaded = http.post("/v1/datasets", files={"file": ("wiki.jsonl", "\n".join(lines).encode(), "application/jsonl")})
    assert uploaded.status_code == 201, uploaded.text
    dataset = uploaded.json()
    assert dataset["kind"] == "text" and dataset["num_records"] == len(lines)

    submitted = http.post("/v1/jobs", json={"model": "local:tiny-llama", "method": "wanda", "sparsity": 0.5,
                                            **{**SMALL, "calibration": {**SMALL["calibration"],
                                                                        "dataset": dataset["id"]}}})
    assert submitted.status_code == 201, submitted.text
    job = wait_until_ended(http, submitted.json()["id"], service)
    assert job["status"] == "succeeded", f"{job['error']}{service.log_tail()}"
    report_id = next(a["id"] for a in http.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
                     if a["name"] == "report.json")
    report = http.get(f"/v1/artifacts/{report_id}/content").json()
    # The report names the dataset as the user knows it, not the worker's scratch path.
    assert report["data"]["dataset"] == dataset["id"] and report["spec"]["calibration"]["dataset"] == dataset["id"]
    assert 0 < report["data"]["num_tokens"] < 20_000
    assert http.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    assert http.get(f"/v1/datasets/{dataset['id']}").status_code == 404
