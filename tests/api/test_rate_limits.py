"""Per-tenant limits answer 429 with Retry-After; another tenant is unaffected. Counters live in Redis."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable

import redis
from fastapi.testclient import TestClient

from app.main import create_app
from app.ratelimit import MAX_BATCH, MemoryLimiter, RedisLimiter, batch_size
from prunekit.core.config import Settings
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


def test_replicas_taking_counts_in_batches_never_admit_more_than_the_limit() -> None:
    """A large limit is taken from Redis a batch at a time (one round trip for many requests); two replicas
    spending their batches side by side still admit no more than the limit, and lose less than a batch each."""
    limit, tag = 640, secrets.token_hex(4)
    batch = batch_size(limit)
    assert 1 < batch <= MAX_BATCH
    bucket = f"test-{tag}:all"

    async def hammer() -> tuple[int, int]:
        replicas = [RedisLimiter(REDIS_URL), RedisLimiter(REDIS_URL)]
        admitted = refused = 0
        for i in range(limit + 100):  # interleaved, as a load balancer would spread them
            if await replicas[i % 2].hit([(bucket, limit)]) is None:
                admitted += 1
            else:
                refused += 1
        return admitted, refused

    if time.time() % 60 > 50:  # stay inside one fixed window
        time.sleep(61 - time.time() % 60)
    admitted, refused = asyncio.run(hammer())
    assert limit - 2 * (batch - 1) <= admitted <= limit
    assert admitted + refused == limit + 100
    start = int(time.time() // 60) * 60
    taken = int(redis.Redis.from_url(REDIS_URL).get(f"prunekit:ratelimit:{bucket}:{start}"))  # type: ignore[arg-type]
    # Far fewer round trips than requests: each took a whole batch from the counter.
    assert taken >= limit and taken % batch == 0
