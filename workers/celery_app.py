"""The Celery app of the worker processes, configured from the one settings class."""

from __future__ import annotations

from app.config import get_settings
from app.queue import make_celery

celery = make_celery(get_settings())
celery.conf.update(include=["workers.tasks"], worker_hijack_root_logger=False)
