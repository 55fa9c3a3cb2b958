"""Delivers a job's end-of-life webhook once; the Celery task decides about retries."""

from __future__ import annotations

import time

from prunekit.core.config import Settings
from prunekit.core.db import queries
from prunekit.core.db.models import Job
from prunekit.core.db.session import session_scope
from prunekit.core.documents import job_document
from prunekit.core.webhooks import JOB_EVENT_TYPES, Delivery, deliver, tenant_secret


def deliver_job_webhook(job_id: str, status: str, attempt: int, settings: Settings) -> Delivery | None:
    """Returns None when there is nothing to send (no webhook, or the job is gone)."""
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        if job is None or not (job.request.get("webhook") or {}).get("url"):
            return None
        url = job.request["webhook"]["url"]
        secret = tenant_secret(session, job.tenant_id)
        event_type = JOB_EVENT_TYPES[status]
        payload = {"type": event_type, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "data": job_document(job)}  # what GET /v1/jobs/{id} answers
    # Stable across retries, so receivers can drop duplicates.
    result = deliver(url, secret, f"msg_{job_id}_{status}", payload, settings.webhook_timeout_s,
                     settings.webhook_allow_private_hosts)
    last = attempt >= settings.webhook_max_attempts or not result.retry
    with session_scope(settings) as session:
        if result.ok:
            message, level = f"Webhook {event_type} delivered ({result.detail}, attempt {attempt}).", "info"
        elif last:
            message, level = f"Webhook {event_type} failed ({result.detail}); giving up after {attempt} attempts.", \
                "error"
        else:
            message, level = f"Webhook {event_type} failed ({result.detail}, attempt {attempt}); retrying.", "warning"
        queries.add_event(session, job_id, message, level=level,
                          data={"webhook": {"type": event_type, "attempt": attempt, "ok": result.ok,
                                            "status_code": result.status_code}})
    return result
