"""The broker carries only "work on job X"; the job itself lives in the database."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from celery import Celery

from prunekit.core.config import Settings

RUN_JOB_TASK = "prunekit.run_job"
DELIVER_WEBHOOK_TASK = "prunekit.deliver_webhook"


def make_celery(settings: Settings) -> Celery:
    if settings.broker_url.startswith("sqla+sqlite:///"):
        from pathlib import Path

        Path(settings.broker_url.removeprefix("sqla+sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    celery = Celery("prunekit", broker=settings.broker_url)
    celery.conf.update(
        task_default_queue=settings.queue_name,
        # Webhooks have their own queue and consumer: a job worker runs one job at a time, for hours, and a
        # delivery queued behind it would wait as long.
        task_routes={DELIVER_WEBHOOK_TASK: {"queue": settings.webhook_queue_name}},
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        # A job whose worker dies mid-run is delivered again instead of being lost.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
    )
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # Pruning runs for hours: Redis must not re-deliver an unacked job while it is still running.
        # (The SQLAlchemy transport hands these options to create_engine, so they are Redis-only.)
        celery.conf.broker_transport_options = {"visibility_timeout": 7 * 24 * 3600}
    return celery


_producers: dict[tuple[str, str, str], Celery] = {}


def _producer(settings: Settings) -> Celery:
    key = (settings.broker_url, settings.queue_name, settings.webhook_queue_name)
    if key not in _producers:
        _producers[key] = make_celery(settings)
    return _producers[key]


def enqueue_job(settings: Settings, job_id: str, sent_at: datetime | None = None,
                countdown: float | None = None) -> None:
    """`sent_at` is the job's `enqueued_at` for this send: it tells the newest message of a job from older ones."""
    kwargs = {"sent_at": sent_at.isoformat()} if sent_at is not None else {}
    _producer(settings).send_task(
        RUN_JOB_TASK, args=[job_id], kwargs=kwargs, queue=settings.queue_name, countdown=countdown, retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
    )


def enqueue_webhook(settings: Settings, job_id: str, status: str) -> None:
    _producer(settings).send_task(DELIVER_WEBHOOK_TASK, args=[job_id, status], queue=settings.webhook_queue_name,
                                  retry=True, retry_policy={"max_retries": 3, "interval_start": 0.2})


@dataclass(frozen=True)
class QueueOutbox:
    """prunekit.core.lifecycle's Outbox on this broker: the core asks for sends without importing Celery."""

    settings: Settings

    def enqueue_job(self, job_id: str, sent_at: datetime | None = None, countdown: float | None = None) -> None:
        enqueue_job(self.settings, job_id, sent_at=sent_at, countdown=countdown)

    def enqueue_webhook(self, job_id: str, status: str) -> None:
        enqueue_webhook(self.settings, job_id, status)


def broker_reachable(settings: Settings) -> bool:
    try:
        with _producer(settings).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:
        return False


def queue_depth(settings: Settings) -> int | None:
    """Messages waiting in the job queue; None when the broker cannot be reached."""
    try:
        with _producer(settings).connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            _, count, _ = conn.default_channel.queue_declare(settings.queue_name, passive=True)
            return int(count)
    except Exception:
        return None
