"""Celery tasks: thin wrappers that hand a job id to the runner or the notifier; the reconciler's start and stop."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from celery import Task
from celery.signals import worker_ready, worker_shutdown

from prunekit.core.config import get_settings
from prunekit.queue import DELIVER_WEBHOOK_TASK, RUN_JOB_TASK
from workers.celery_app import celery
from workers.reconcile import Reconciler


@celery.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str, sent_at: str | None = None) -> None:
    from workers.runner import execute_job  # torch loads on first use, not when Celery imports the module

    execute_job(job_id, get_settings(), datetime.fromisoformat(sent_at) if sent_at else None)


@celery.task(name=DELIVER_WEBHOOK_TASK, bind=True, acks_late=True, max_retries=None)
def deliver_webhook(self: Task, job_id: str, status: str) -> None:
    from workers.notify import deliver_job_webhook

    settings = get_settings()
    attempt = self.request.retries + 1
    result = deliver_job_webhook(job_id, status, attempt, settings)
    if result is not None and not result.ok and result.retry and attempt < settings.webhook_max_attempts:
        # Back on the webhook queue, never behind a job.
        raise self.retry(countdown=settings.webhook_backoff_s * 2 ** (attempt - 1), queue=settings.webhook_queue_name)


_reconciler: Reconciler | None = None


@worker_ready.connect
def start_reconciler(sender: Any = None, **_: object) -> None:
    """The reconciler runs where jobs run: a webhook consumer (`prunekit worker --webhooks`) has none."""
    global _reconciler
    settings = get_settings()
    consumed = sender.app.amqp.queues.consume_from if sender is not None else None
    if consumed is not None and settings.queue_name not in consumed:
        return
    _reconciler = Reconciler(settings)
    _reconciler.start()


@worker_shutdown.connect
def stop_reconciler(**_: object) -> None:
    if _reconciler is not None:
        _reconciler.stop()
