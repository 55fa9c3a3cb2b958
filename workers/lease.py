"""A worker's hold on one job: the lease row in the database, a heartbeat thread, and lease-checked writes."""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from prunekit.core import lifecycle
from prunekit.core.config import Settings
from prunekit.core.db import queries
from prunekit.core.db.session import session_factory, session_scope, transaction
from prunekit.core.periodic import Periodic

log = logging.getLogger("prunekit.worker")
T = TypeVar("T")

# How long a running job waits for a database it cannot reach (a restart, a failover) before its attempt gives up.
# Waiting costs nothing but the worker's time, while giving up costs the work since the last checkpoint.


class LeaseLost(Exception):
    """Another worker owns the job now (this one was presumed dead): stop without writing anything."""


class DatabaseUnavailable(Exception):
    """The database stayed out of reach for DATABASE_PATIENCE_S: the attempt stops without writing, as one that lost
    its lease does. The job is not failed: once the database is back its lease runs out, the reconciler re-sends
    it, and the next attempt resumes from the last checkpoint."""


def database_down(exc: BaseException) -> bool:
    """Whether `exc` says the database could not be reached or the connection broke (a restart, a failover, a
    network fault), rather than that a statement was wrong. Also a lock wait or serialisation failure: retried,
    those pass too."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError | InterfaceError)


def new_owner() -> str:
    # One id per claim, not per process: a process that loses a job and claims it again is a new holder.
    return f"{lifecycle.owner_prefix(socket.gethostname(), os.getpid())}{uuid.uuid4().hex[:12]}"


class Lease:
    def __init__(self, job_id: str, owner: str, attempt: int, settings: Settings) -> None:
        self.job_id, self.owner, self.attempt, self.settings = job_id, owner, attempt, settings
        self.lost = threading.Event()
        self._unreachable_since: float | None = None  # the database went away; the next write says so
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
        """A transaction that first proves (and renews) the lease; nothing in it commits if the lease is gone.
        Opening it waits (patiently) for a database that cannot be reached."""
        self.check()
        with transaction(self.patiently(self._open, "proving the lease")) as session:
            yield session

    def write(self, write: Callable[[Session], T], what: str) -> T:
        """write(session) in a lease-proving transaction, the whole transaction tried again while the database
        cannot be reached (the connection may break in the middle of it, too). The first write after an outage
        tells the job's events how long the job waited for the database."""

        def transaction() -> T:
            with self.session() as session:
                if self._unreachable_since is not None:  # first, so that a job's last event stays its end
                    waited = round(time.monotonic() - self._unreachable_since, 1)
                    queries.add_event(session, self.job_id, f"The database could not be reached for {waited:g} s; "
                                      "the job waited for it and carried on.", level="warning",
                                      data={"database_unreachable_s": waited})
                result = write(session)
            self._unreachable_since = None
            return result

        return self.patiently(transaction, what)

    def patiently(self, call: Callable[[], T], what: str) -> T:
        """call() again, with a growing jittered pause, while the database cannot be reached; DatabaseUnavailable
        after DATABASE_PATIENCE_S from the first failure. Each pause first checks the lease: a heartbeat that found
        another holder ends the wait with LeaseLost."""
        deadline: float | None = None
        delay = 0.5
        while True:
            try:
                return call()
            except Exception as exc:
                if not database_down(exc):
                    raise
                now = time.monotonic()
                deadline = now + self.settings.database_patience_s if deadline is None else deadline
                self._unreachable_since = self._unreachable_since or now
                if now >= deadline:
                    patience = self.settings.database_patience_s
                    raise DatabaseUnavailable(f"the database could not be reached for {patience:g} s while {what}: "
                                              f"{type(exc).__name__}: {exc}") from exc
                self.check()
                pause = min(delay * random.uniform(0.5, 1.0), deadline - now)
                log.warning("database unreachable while %s for job %s, retrying in %.1f s: %s", what, self.job_id,
                            pause, exc)
                time.sleep(pause)
                delay = min(delay * 2, 5.0)

    def _open(self) -> Session:
        session = session_factory(self.settings)()
        try:
            held = queries.touch_lease(session, self.job_id, self.owner, self.settings.job_lease_s)
        except BaseException:
            session.close()  # rolls back, and tolerates a connection that broke
            raise
        if not held:
            session.close()
            self.lost.set()
            raise LeaseLost(self.job_id)
        return session

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
