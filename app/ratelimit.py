"""Per-tenant request limits in fixed one-minute windows, shared through Redis by every API replica
(in-process when the service runs embedded, where there is only one)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

WINDOW_S = 60


class Limiter(Protocol):
    def hit(self, bucket: str, limit: int) -> int | None:
        """Counts one request; returns the seconds to wait when over the limit, else None."""
        ...


def _window(now: float) -> tuple[int, int]:
    start = int(now // WINDOW_S) * WINDOW_S
    return start, start + WINDOW_S - int(now)


@dataclass
class MemoryLimiter:
    counts: dict[tuple[str, int], int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hit(self, bucket: str, limit: int) -> int | None:
        start, retry_after = _window(time.time())
        with self.lock:
            for key in [k for k in self.counts if k[1] < start]:
                del self.counts[key]
            count = self.counts.get((bucket, start), 0) + 1
            self.counts[(bucket, start)] = count
        return max(1, retry_after) if count > limit else None


@dataclass
class RedisLimiter:
    url: str

    def __post_init__(self) -> None:
        import redis

        self.client = redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)

    def hit(self, bucket: str, limit: int) -> int | None:
        start, retry_after = _window(time.time())
        key = f"prunekit:ratelimit:{bucket}:{start}"
        try:
            pipe = self.client.pipeline()
            pipe.incr(key)
            pipe.expire(key, 2 * WINDOW_S)
            count = int(pipe.execute()[0])
        except Exception:
            return None  # a limiter outage must not take the API down with it
        return max(1, retry_after) if count > limit else None


def make_limiter(url: str) -> Limiter:
    return RedisLimiter(url) if url.startswith(("redis://", "rediss://")) else MemoryLimiter()
