"""GET /v1/jobs/{id}/events/stream: Server-Sent Events until the job ends, resumable."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient

JOB = {"model": "local:tiny-llama", "method": "wanda", "sparsity": 0.5}


def read_sse(client: TestClient, path: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    with client.stream("GET", path, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        current: dict[str, Any] = {}
        for line in response.iter_lines():
            if line == "":
                if current:
                    frames.append(current)
                current = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(": ")
                current[field] = value
    return frames


def test_stream_of_an_ended_job_replays_its_events_then_ends(client: TestClient, auth: dict[str, str]) -> None:
    job = client.post("/v1/jobs", json=JOB, headers=auth).json()
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    frames = [f for f in read_sse(client, f"/v1/jobs/{job['id']}/events/stream", auth) if "event" in f]
    assert [f["event"] for f in frames] == ["message", "message", "end"]
    statuses = [json.loads(f["data"])["data"]["status"] for f in frames[:2]]
    assert statuses == ["queued", "cancelled"]

    resumed = read_sse(client, f"/v1/jobs/{job['id']}/events/stream", {**auth, "Last-Event-ID": frames[0]["id"]})
    assert [f.get("id") for f in resumed if f.get("event") == "message"] == [frames[1]["id"]]


def test_stream_of_another_tenants_job_is_404(client: TestClient, auth: dict[str, str], new_key: Any) -> None:
    job = client.post("/v1/jobs", json=JOB, headers=auth).json()
    other = {"Authorization": f"Bearer {new_key('tenant-b')}"}
    response = client.get(f"/v1/jobs/{job['id']}/events/stream", headers=other)
    assert response.status_code == 404 and response.json()["code"] == "job_not_found"
