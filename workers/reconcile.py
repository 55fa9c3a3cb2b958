"""The reconciler: the database is the source of truth, so it re-sends what the broker may have lost.

It re-enqueues jobs `queued` in the database whose message may be gone (a broker restart without persistence,
a failed send from the API), and jobs `running` whose lease expired (their worker stopped heartbeating). It
never runs a job itself: the runner's claim decides, so a duplicate message is harmless.

Every worker process runs it, at start-up and then every `reconcile_interval_s`, in a daemon thread of its own.
Why a thread rather than celery beat (-B): beat would deliver its ticks through the very broker whose losses
this repairs, needs a schedule file and one beat per deployment, while a thread behaves the same on Redis and
on the embedded `sqla+sqlite` broker. Several workers reconciling at once is safe: each re-send is a
compare-and-set on `enqueued_at`, so one of them sends it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from prunekit.core import lifecycle
from prunekit.core.config import Settings
from prunekit.core.db import queries
from prunekit.core.db.session import session_scope
from prunekit.core.periodic import Periodic
from prunekit.core.storage import ArtifactStore, make_store
from prunekit.queue import QueueOutbox
from prunekit.vocabulary import JobStatus

log = logging.getLogger("prunekit.reconcile")

# A job waiting long in a busy queue is re-sent ever more rarely (its message is most likely still there),
# so duplicates stay few; at most this many reconcile intervals apart.
MAX_BACKOFF_INTERVALS = 10


@dataclass(frozen=True)
class Report:
    resent: list[str]
    cancelled: list[str]


def resend_due(job: queries.Unsent, now: datetime, base_s: float) -> bool:
    """Never sent since it became runnable: now. Otherwise after a gap that doubles with the time it has waited
    (base, 2 base, 4 base, ...) up to MAX_BACKOFF_INTERVALS * base."""
    if job.enqueued_at is None or job.enqueued_at < job.since:
        return True
    waited = (job.enqueued_at - job.since).total_seconds()
    gap = min(max(base_s, waited), MAX_BACKOFF_INTERVALS * base_s)
    return (now - job.enqueued_at).total_seconds() >= gap


def reconcile_once(settings: Settings, store: ArtifactStore | None = None,
                   outbox: lifecycle.Outbox | None = None) -> Report:
    """One round. A caller that reconciles again and again passes its own store and outbox (one per process)."""
    outbox = outbox or QueueOutbox(settings)
    base_s = settings.reconcile_interval_s
    with session_scope(settings) as session:
        # The database's clock, not this host's: leases expire on it, and the enqueued_at this round writes is
        # compared with the ones other workers wrote (a worker whose clock is minutes off re-sends nothing early).
        now = queries.database_now(session)
        candidates = queries.jobs_to_resend(session, now - timedelta(seconds=base_s))
    resent, cancelled = [], []
    for job in candidates:
        if job.status == JobStatus.CANCEL_REQUESTED:
            store = store or make_store(settings)
            if _cancel(job.id, settings, store, outbox):
                cancelled.append(job.id)
        elif resend_due(job, now, base_s) and _resend(job, now, settings, outbox):
            resent.append(job.id)
    if resent or cancelled:
        log.info("reconciled: re-sent %d job(s) %s, cancelled %d abandoned", len(resent), resent, len(cancelled))
    return Report(resent, cancelled)


def _resend(job: queries.Unsent, now: datetime, settings: Settings, outbox: lifecycle.Outbox) -> bool:
    with session_scope(settings) as session:
        if not queries.mark_enqueued(session, job.id, job.enqueued_at, now):
            return False  # another worker's reconciler (or the runner) sent it just now
    try:
        outbox.enqueue_job(job.id, sent_at=now)
    except Exception as exc:
        log.warning("could not re-send %s (next round retries): %s", job.id, exc)
        with session_scope(settings) as session:
            queries.mark_enqueued(session, job.id, now, job.enqueued_at)
        return False
    return True


def _cancel(job_id: str, settings: Settings, store: ArtifactStore, outbox: lifecycle.Outbox) -> bool:
    with session_scope(settings) as session:
        ended = lifecycle.cancel_abandoned(session, job_id)
    if ended is None:
        return False
    # Its checkpoints and whatever its dead worker had uploaded, removed once the compare-and-set made the job ours
    # to end (as the runner does for a job it cancels itself).
    lifecycle.drop_files(store, ended.tenant_id, job_id)
    lifecycle.announce(outbox, ended)
    return True


class Reconciler:
    """The periodic loop; one per worker process, with one artifact store and one outbox."""

    def __init__(self, settings: Settings) -> None:
        self.settings, self.outbox = settings, QueueOutbox(settings)
        self.store: ArtifactStore | None = None  # made in the loop, where a failure is retried
        self._loop = Periodic("prunekit-reconciler", settings.reconcile_interval_s, self._round, at_start=True)

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def _round(self) -> None:
        try:
            self.store = self.store or make_store(self.settings)
            reconcile_once(self.settings, self.store, self.outbox)
        except Exception as exc:  # the database or broker is down: try again next round
            log.warning("reconcile failed (retrying in %.0f s): %s", self.settings.reconcile_interval_s, exc)
