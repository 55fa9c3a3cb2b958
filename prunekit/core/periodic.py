"""A daemon thread that calls a function at a fixed interval until stopped (the lease's heartbeat, the reconciler)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("prunekit.periodic")


class Periodic:
    """Calls `tick` every `interval_s` seconds, first at once (`at_start`) or after one interval.

    `tick` handles its own errors; one that escapes is logged and the next tick comes as planned, because a thread
    that died silently would stop a heartbeat or the reconciler for the rest of the process. `tick` may call
    stop() itself (a lease that is lost beats no more).
    """

    def __init__(self, name: str, interval_s: float, tick: Callable[[], None], at_start: bool = False) -> None:
        self.interval_s, self._tick, self._at_start = interval_s, tick, at_start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=timeout_s)

    def _loop(self) -> None:
        if self._at_start:
            self._run_tick()
        while not self._stop.wait(self.interval_s):
            self._run_tick()

    def _run_tick(self) -> None:
        if self._stop.is_set():
            return
        try:
            self._tick()
        except Exception:
            log.exception("%s: periodic call failed (the next one comes in %.0f s)", self._thread.name,
                          self.interval_s)
