"""A worker's hold on one job: the lease row in the database, a heartbeat thread, and lease-checked writes."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.orm import Session

from prunekit.core.config import Settings
from prunekit.core.db import queries
from prunekit.core.db.session import session_scope
from prunekit.core.periodic import Periodic

log = logging.getLogger("prunekit.worker")


class LeaseLost(Exception):
    """Another worker owns the job now (this one was presumed dead): stop without writing anything."""


def new_owner() -> str:
    # One id per claim, not per process: a process that loses a job and claims it again is a new holder.
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class Lease:
    def __init__(self, job_id: str, owner: str, attempt: int, settings: Settings) -> None:
        self.job_id, self.owner, self.attempt, self.settings = job_id, owner, attempt, settings
        self.lost = threading.Event()
        # Three beats per lease: one slow or failed beat (a database blip) does not lose the job.
        self._heartbeat = Periodic(f"lease-{job_id}", settings.job_lease_s / 3, self._beat)

    def start(self) -> None:
        self._heartbeat.start()

    def stop(self) -> None:
        self._heartbeat.stop()

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLost(self.job_id)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction that first proves (and renews) the lease; nothing in it commits if the lease is gone."""
        self.check()
        with session_scope(self.settings) as session:
            if not queries.touch_lease(session, self.job_id, self.owner, self.settings.job_lease_s):
                self.lost.set()
                raise LeaseLost(self.job_id)
            yield session

    def _beat(self) -> None:
        try:
            with session_scope(self.settings) as session:
                held = queries.touch_lease(session, self.job_id, self.owner, self.settings.job_lease_s)
        except Exception as exc:
            log.warning("heartbeat of %s failed (retrying): %s", self.job_id, exc)
            return
        if not held:
            log.warning("lease of %s lost: another worker took the job over", self.job_id)
            self.lost.set()
            self._heartbeat.stop()
