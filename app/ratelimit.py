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


# A process takes counts from Redis in batches and spends them locally, so that most requests are checked without
# a round trip: at most 1/BATCH_SHARE of a limit at a time (limits up to BATCH_SHARE a minute stay exact, one
# round trip a request) and at most MAX_BATCH. Every count is taken from the shared counter before it is spent, so
# the replicas together never admit more than the limit; a process's unspent batch (less than MAX_BATCH) is lost
# when its window ends.
BATCH_SHARE = 50
MAX_BATCH = 32

# One round trip for every bucket a request needs counts for: take each bucket's batch in order, stop after the
# first bucket with none left. KEYS: the buckets' counters of this window; ARGV[1]: their lifetime in seconds;
# ARGV[2i], ARGV[2i + 1]: bucket i's limit and batch. Returns the counts granted, bucket by bucket, up to and
# including the first 0.
_TAKE_SCRIPT = """
local granted = {}
for i, key in ipairs(KEYS) do
    local limit, batch = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
    local after = redis.call('INCRBY', key, batch)
    redis.call('EXPIRE', key, ARGV[1])
    granted[i] = math.max(0, math.min(batch, limit - (after - batch)))
    if granted[i] == 0 then
        return granted
    end
end
return granted
"""


def batch_size(limit: int) -> int:
    return max(1, min(MAX_BATCH, limit // BATCH_SHARE))


@dataclass
class RedisLimiter:
    """Asks Redis from the event loop (redis.asyncio), once per batch of counts (see MAX_BATCH), never from a
    thread. A client belongs to one event loop; a process normally runs one, tests one per TestClient."""

    url: str
    held: dict[tuple[str, int], int] = field(default_factory=dict, repr=False)  # (bucket, window) -> counts left
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False, repr=False)
    _script: Any = field(default=None, init=False, repr=False)

    def _script_of_this_loop(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            import redis.asyncio

            client = redis.asyncio.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)
            # EVALSHA, loading the script again by itself after a Redis restart emptied the script cache.
            self._loop, self._script = loop, client.register_script(_TAKE_SCRIPT)
        return self._script

    async def hit(self, buckets: list[tuple[str, int]]) -> Refusal | None:
        start, retry_after = _window(time.time())
        for key in [k for k in self.held if k[1] < start]:
            del self.held[key]
        # Normally once round: a request whose buckets all hold counts passes without an await. Another request of
        # this process may spend the counts just taken while this one waits for Redis, hence the loop.
        for _ in range(4):
            short = [(bucket, limit) for bucket, limit in buckets if not self.held.get((bucket, start))]
            if not short:
                for bucket, _ in buckets:
                    self.held[(bucket, start)] -= 1
                return None
            try:
                script = self._script_of_this_loop()
                granted = [int(n) for n in await script(
                    keys=[f"prunekit:ratelimit:{bucket}:{start}" for bucket, _ in short],
                    args=[2 * WINDOW_S, *(x for _, limit in short for x in (limit, batch_size(limit)))])]
            except Exception:
                return None  # a limiter outage must not take the API down with it
            for (bucket, _), n in zip(short, granted, strict=False):
                self.held[(bucket, start)] = self.held.get((bucket, start), 0) + n
            if granted and granted[-1] == 0:
                refused_bucket, limit = short[len(granted) - 1]
                # As for a request refused in one round trip: counted in the buckets before the one that refused it.
                for bucket, _ in buckets:
                    if bucket == refused_bucket:
                        break
                    if self.held.get((bucket, start)):
                        self.held[(bucket, start)] -= 1
                return Refusal(limit, max(1, retry_after))
        return None


def make_limiter(url: str) -> Limiter:
    return RedisLimiter(url) if url.startswith(("redis://", "rediss://")) else MemoryLimiter()
