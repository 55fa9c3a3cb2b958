"""GET /metrics: Prometheus text with job counts, queue depth and HTTP latency."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

JOB = {"model": "local:tiny-llama", "method": "wanda", "sparsity": 0.5}


def sample(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


def test_metrics_count_jobs_queue_and_requests(client: TestClient, auth: dict[str, str]) -> None:
    before = client.get("/metrics").text
    queued_before = sample(before, "prunekit_jobs", '{status="queued"}')
    for _ in range(3):
        job = client.post("/v1/jobs", json=JOB, headers=auth).json()
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    client.get(f"/v1/jobs/{job['id']}", headers=auth)

    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert sample(text, "prunekit_jobs", '{status="queued"}') == queued_before + 2
    assert sample(text, "prunekit_jobs", '{status="cancelled"}') >= 1
    # Three messages were sent to this test's own queue and no worker consumes it.
    assert sample(text, "prunekit_queue_depth") == 3
    # Latency is labelled by route template, so job ids do not explode the series count.
    assert sample(text, "prunekit_http_request_duration_seconds_count",
                  '{method="GET",route="/v1/jobs/{job_id}",status="200"}') == 1
    assert job["id"] not in text
