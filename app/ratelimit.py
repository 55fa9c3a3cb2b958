"""Per-tenant request limits in fixed one-minute windows, shared through Redis by every API replica
(in-process when the service runs embedded, where there is only one)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

WINDOW_S = 60


@dataclass(frozen=True)
class Refusal:
    limit: int  # the limit of the first bucket that was over
    retry_after: int  # seconds until its window ends (at least 1)


class Limiter(Protocol):
    async def hit(self, buckets: list[tuple[str, int]]) -> Refusal | None:
        """Counts one request in each (bucket, limit), in order, stopping at the first bucket over its limit (the
        buckets after it are not counted); returns that bucket's refusal, or None when every bucket allows it."""
        ...


def _window(now: float) -> tuple[int, int]:
    start = int(now // WINDOW_S) * WINDOW_S
    return start, start + WINDOW_S - int(now)


@dataclass
class MemoryLimiter:
    counts: dict[tuple[str, int], int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def hit(self, buckets: list[tuple[str, int]]) -> Refusal | None:
        start, retry_after = _window(time.time())
        with self.lock:  # held for microseconds, never across an await
            for key in [k for k in self.counts if k[1] < start]:
                del self.counts[key]
            for bucket, limit in buckets:
                count = self.counts.get((bucket, start), 0) + 1
                self.counts[(bucket, start)] = count
                if count > limit:
                    return Refusal(limit, max(1, retry_after))
        return None


# One round trip for every bucket of a request: count in order, stop at the first one over its limit.
# KEYS: the buckets' counters of this window; ARGV[1]: their lifetime in seconds; ARGV[1 + i]: bucket i's limit.
# Returns the 1-based index of the bucket over its limit, or 0.
_HIT_SCRIPT = """
for i, key in ipairs(KEYS) do
    local count = redis.call('INCR', key)
    redis.call('EXPIRE', key, ARGV[1])
    if count > tonumber(ARGV[i + 1]) then
        return i
    end
end
return 0
"""


@dataclass
class RedisLimiter:
    """Asks Redis from the event loop (redis.asyncio): a request's check costs one round trip and no hand-off to a
    thread. A client belongs to one event loop; a process normally runs one, tests one per TestClient."""

    url: str
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False, repr=False)
    _script: Any = field(default=None, init=False, repr=False)

    def _script_of_this_loop(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            import redis.asyncio

            client = redis.asyncio.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)
            # EVALSHA, loading the script again by itself after a Redis restart emptied the script cache.
            self._loop, self._script = loop, client.register_script(_HIT_SCRIPT)
        return self._script

    async def hit(self, buckets: list[tuple[str, int]]) -> Refusal | None:
        start, retry_after = _window(time.time())
        keys = [f"prunekit:ratelimit:{bucket}:{start}" for bucket, _ in buckets]
        try:
            script = self._script_of_this_loop()
            over = int(await script(keys=keys, args=[2 * WINDOW_S, *(limit for _, limit in buckets)]))
        except Exception:
            return None  # a limiter outage must not take the API down with it
        return Refusal(buckets[over - 1][1], max(1, retry_after)) if over else None


def make_limiter(url: str) -> Limiter:
    return RedisLimiter(url) if url.startswith(("redis://", "rediss://")) else MemoryLimiter()
