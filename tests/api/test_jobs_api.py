"""The jobs API against a real Postgres and a real Redis queue (no worker: jobs stay queued)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import redis
from fastapi.testclient import TestClient

from prunekit.core.config import Settings
from tests.conftest import REDIS_URL

JOB = {"model": "local:tiny-llama", "method": "wanda", "sparsity": 0.5}


def submit(client: TestClient, auth: dict[str, str], **overrides: Any) -> dict[str, Any]:
    response = client.post("/v1/jobs", json={**JOB, **overrides}, headers=auth)
    assert response.status_code == 201, response.text
    return response.json()


def test_create_job_fills_defaults_and_enqueues_it(client: TestClient, auth: dict[str, str],
                                                   settings: Settings) -> None:
    job = submit(client, auth, metadata={"team": "search"})
    assert job["id"].startswith("job_") and job["object"] == "pruning.job"
    assert job["status"] == "queued" and job["started_at"] is None and job["error"] is None
    assert job["metadata"] == {"team": "search"}
    assert job["request"]["pattern"] == "unstructured" and job["request"]["allocation"] == "uniform"
    assert job["request"]["calibration"] == {"dataset": "builtin:wiki-en", "num_samples": 64, "seq_len": 512,
                                             "seed": 0}
    # The message really reached the broker: one entry on this test's Redis queue, naming the job.
    queued = redis.Redis.from_url(REDIS_URL).lrange(settings.queue_name, 0, -1)
    assert len(queued) == 1 and job["id"].encode() in queued[0]
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).json() == job


def test_list_is_newest_first_with_cursor_and_status_filter(client: TestClient, auth: dict[str, str]) -> None:
    ids = [submit(client, auth)["id"] for _ in range(5)]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth)
    pages, after = [], None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"after": after} if after else {})}
        page = client.get("/v1/jobs", params=params, headers=auth).json()
        pages.append([j["id"] for j in page["data"]])
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert pages == [ids[4:2:-1], ids[2:0:-1], ids[:1]]
    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}, headers=auth).json()
    assert [j["id"] for j in cancelled["data"]] == [ids[0]] and cancelled["has_more"] is False


def test_cancel_queued_job_then_conflict(client: TestClient, auth: dict[str, str]) -> None:
    job = submit(client, auth)
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["finished_at"] is not None
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"
    assert again.json()["code"] == "job_already_ended"


def test_events_record_the_job_history_and_page_by_id(client: TestClient, auth: dict[str, str]) -> None:
    job = submit(client, auth)
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=auth).json()["data"]
    assert [e["data"]["status"] for e in events] == ["queued", "cancelled"]
    assert all(e["level"] == "info" and e["type"] == "message" for e in events)
    later = client.get(f"/v1/jobs/{job['id']}/events", params={"after": events[0]["id"]}, headers=auth).json()
    assert [e["id"] for e in later["data"]] == [events[1]["id"]]


def test_idempotency_key_returns_the_same_job_or_conflicts(client: TestClient, auth: dict[str, str]) -> None:
    headers = {**auth, "Idempotency-Key": "nightly-2026-11-22"}
    first = client.post("/v1/jobs", json=JOB, headers=headers)
    second = client.post("/v1/jobs", json=JOB, headers=headers)
    assert first.status_code == second.status_code == 201
    assert second.json()["id"] == first.json()["id"] and second.headers["Idempotent-Replayed"] == "true"
    other = client.post("/v1/jobs", json={**JOB, "sparsity": 0.6}, headers=headers)
    assert other.status_code == 409 and other.json()["param"] == "Idempotency-Key"
    assert len(client.get("/v1/jobs", headers=auth).json()["data"]) == 1


def test_another_tenants_job_is_not_found(client: TestClient, auth: dict[str, str],
                                          new_key: Callable[[str], str]) -> None:
    job = submit(client, auth)
    other = {"Authorization": f"Bearer {new_key('tenant-b')}"}
    for method, path in [("GET", f"/v1/jobs/{job['id']}"), ("POST", f"/v1/jobs/{job['id']}/cancel"),
                         ("GET", f"/v1/jobs/{job['id']}/events"), ("GET", f"/v1/jobs/{job['id']}/artifacts")]:
        response = client.request(method, path, headers=other)
        assert response.status_code == 404, path
        assert response.json()["code"] == "job_not_found" and response.json()["param"] == "id"
    assert client.get("/v1/jobs", headers=other).json()["data"] == []
    # The owner still sees it untouched.
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["status"] == "queued"


def test_artifacts_of_a_queued_job_and_unknown_artifact(client: TestClient, auth: dict[str, str]) -> None:
    job = submit(client, auth)
    assert client.get(f"/v1/jobs/{job['id']}/artifacts", headers=auth).json()["data"] == []
    for path in ["/v1/artifacts/art_nope", "/v1/artifacts/art_nope/content"]:
        response = client.get(path, headers=auth)
        assert response.status_code == 404 and response.json()["code"] == "artifact_not_found"


def test_a_job_read_survives_the_database_dropping_the_pooled_connections(
        client: TestClient, settings: Settings, new_key: Callable[[str], str]) -> None:
    """GET /v1/jobs/{id} reads on a pool that does not ping before each read (a round trip a request): a
    connection the database dropped is found on use, and the read runs again on a new one, unseen by the client."""
    auth = {"Authorization": f"Bearer {new_key('reader')}"}
    job = submit(client, auth)
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).status_code == 200  # the read pool holds a connection
    # What a database restart does to an API process's idle connections, without restarting the shared server.
    with psycopg.connect(settings.database_url.replace("postgresql+psycopg://", "postgresql://", 1),
                         autocommit=True) as admin:
        dropped = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = "
                                "current_database() AND pid <> pg_backend_pid() AND state = 'idle'").fetchone()
    assert dropped is not None and dropped[0] >= 1
    response = client.get(f"/v1/jobs/{job['id']}", headers=auth)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == job["id"]
