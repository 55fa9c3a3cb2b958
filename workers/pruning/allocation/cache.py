"""A score cache in a local folder: for benchmarks, notebooks and single machines (the worker keeps its
cache in the artifact store instead, workers/score_cache.py)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class FolderScoreCache:
    root: Path

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.root / f"{key}.json"
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        partial = self.root / f"{key}.json.partial"
        partial.write_text(json.dumps(value), encoding="utf-8")
        os.replace(partial, self.root / f"{key}.json")  # readers never see half a file
