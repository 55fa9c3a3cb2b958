"""Per-tenant limits answer 429 with Retry-After; another tenant is unaffected. Counters live in Redis."""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app

JOB = {"model": "local:tiny-llama", "method": "wanda", "sparsity": 0.5}


def test_tenant_over_its_limits_gets_429(settings: Settings, new_key: Callable[[str], str]) -> None:
    limited = settings.model_copy(update={"rate_limit_per_minute": 6, "job_create_limit_per_minute": 2})
    a = {"Authorization": f"Bearer {new_key('tenant-a')}"}
    b = {"Authorization": f"Bearer {new_key('tenant-b')}"}
    if time.time() % 60 > 54:  # stay inside one fixed window for the whole test
        time.sleep(61 - time.time() % 60)
    with TestClient(create_app(limited)) as client:
        created = [client.post("/v1/jobs", json=JOB, headers=a).status_code for _ in range(3)]
        assert created == [201, 201, 429]
        reads = [client.get("/v1/jobs", headers=a).status_code for _ in range(4)]
        assert reads == [200, 200, 200, 429]
        response = client.get("/v1/jobs", headers=a)
        assert response.status_code == 429 and response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "rate_limited"
        assert 1 <= int(response.headers["Retry-After"]) <= 60
        assert client.get("/v1/jobs", headers=b).status_code == 200
        # Unauthenticated probes and health checks are not counted against anyone.
        assert client.get("/healthz").status_code == 200
    # A second API replica shares the counters through Redis.
    with TestClient(create_app(limited)) as replica:
        assert replica.get("/v1/jobs", headers=a).status_code == 429
