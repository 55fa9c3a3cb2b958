"""The Celery app of the worker processes, configured from the one settings class."""

from __future__ import annotations

from prunekit.core.config import get_settings
from prunekit.queue import make_celery

celery = make_celery(get_settings())
celery.conf.update(include=["workers.tasks"], worker_hijack_root_logger=False)
