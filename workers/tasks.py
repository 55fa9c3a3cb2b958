"""Celery tasks: thin wrappers that hand a job id to the runner or the notifier."""

from __future__ import annotations

from celery import Task

from app.config import get_settings
from app.queue import DELIVER_WEBHOOK_TASK, RUN_JOB_TASK
from workers.celery_app import celery


@celery.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> None:
    from workers.runner import execute_job  # torch loads on first use, not when Celery imports the module

    execute_job(job_id, get_settings())


@celery.task(name=DELIVER_WEBHOOK_TASK, bind=True, acks_late=True, max_retries=None)
def deliver_webhook(self: Task, job_id: str, status: str) -> None:
    from workers.notify import deliver_job_webhook

    settings = get_settings()
    attempt = self.request.retries + 1
    result = deliver_job_webhook(job_id, status, attempt, settings)
    if result is not None and not result.ok and attempt < settings.webhook_max_attempts:
        raise self.retry(countdown=settings.webhook_backoff_s * 2 ** (attempt - 1))
