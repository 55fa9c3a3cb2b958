"""Allocation scores kept in the artifact store, per tenant, so that a later job with the same model, data
and scoring options (at any sparsity) skips the scoring pass.

Per tenant rather than shared: the scores are computed from the tenant's own data, and another tenant must not
learn from a cache hit that somebody scored the same model on the same dataset.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunekit.core import layout
from prunekit.core.storage import ArtifactStore

log = logging.getLogger("prunekit.worker")


@dataclass
class StoreScoreCache:
    store: ArtifactStore
    prefix: str
    scratch: Path

    @classmethod
    def for_tenant(cls, store: ArtifactStore, tenant_id: str, scratch: Path) -> StoreScoreCache:
        return cls(store, layout.score_cache_prefix(tenant_id), scratch)

    def get(self, key: str) -> dict[str, Any] | None:
        name = f"{self.prefix}/{key}.json"
        try:
            if not self.store.exists(name):
                return None
            path = self.scratch / f"{key}.json"
            self.store.download_file(name, path)
            value = json.loads(path.read_text(encoding="utf-8"))
        except Exception as exc:  # an unreadable entry costs a scoring pass, never the job
            log.warning("score cache entry %s unreadable, scoring again: %s", key, exc)
            return None
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)
        # A temporary file of the job's own scratch, removed once stored (a sweep may put several entries).
        path: Path | None = None
        try:
            fd, name = tempfile.mkstemp(suffix=".json", dir=self.scratch)
            path = Path(name)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(value, fh)
            self.store.put_file(f"{self.prefix}/{key}.json", path, "application/json")
        except Exception as exc:  # the job has its scores; only a later job loses the shortcut
            log.warning("could not store score cache entry %s: %s", key, exc)
        finally:
            if path is not None:
                path.unlink(missing_ok=True)
