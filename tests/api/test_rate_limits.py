"""Per-tenant limits answer 429 with Retry-After; another tenant is unaffected. Counters live in Redis."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable

import redis
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.ratelimit import MemoryLimiter, RedisLimiter
from tests.conftest import REDIS_URL

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


def test_both_limiters_count_buckets_in_order_and_stop_at_the_first_refusal() -> None:
    """One round trip for all of a request's buckets (a Lua script on Redis), with the order of the checks kept:
    a request refused by its first bucket is not counted in the next."""
    tag = secrets.token_hex(4)

    async def check(limiter: RedisLimiter | MemoryLimiter) -> None:
        all_, create = f"test-{tag}-{type(limiter).__name__}:all", f"test-{tag}-{type(limiter).__name__}:create"
        assert await limiter.hit([(all_, 3), (create, 1)]) is None
        refusal = await limiter.hit([(all_, 3), (create, 1)])
        assert refusal is not None and refusal.limit == 1 and 1 <= refusal.retry_after <= 60
        assert await limiter.hit([(all_, 3)]) is None  # the third request of `all_`
        refusal = await limiter.hit([(all_, 3), (create, 1)])
        assert refusal is not None and refusal.limit == 3
        # Refused by `all_`, so not counted in `create`: were it counted, `create` would stand at 3, not 2.
        start = int(time.time() // 60) * 60
        if isinstance(limiter, RedisLimiter):
            client = redis.Redis.from_url(REDIS_URL)
            assert int(client.get(f"prunekit:ratelimit:{create}:{start}")) == 2  # type: ignore[arg-type]
            assert 0 < client.ttl(f"prunekit:ratelimit:{create}:{start}") <= 120  # type: ignore[operator]
        else:
            assert limiter.counts[(create, start)] == 2

    for limiter in (RedisLimiter(REDIS_URL), MemoryLimiter()):
        if time.time() % 60 > 57:  # stay inside one fixed window
            time.sleep(61 - time.time() % 60)
        asyncio.run(check(limiter))
