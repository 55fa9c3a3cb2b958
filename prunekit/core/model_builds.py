"""Models that are still being built under the models root, and how a reader tells them from finished ones.

A finished model is a folder `<models_root>/<name>/` holding `config.json`: every builder and importer writes into a
hidden temporary folder beside it and renames it into place, so a visible folder is always complete. A model that
`prunekit up` builds in the background (the vision-language demo models take minutes) has, until then, a marker
`<models_root>/.building/<name>.json`; the API lists it as not ready. A failed build leaves its marker with an
`error`, and no folder. Names starting with "." are never models (temporary folders, this marker folder).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

BUILDING_DIR = ".building"


def marker_path(models_root: Path, name: str) -> Path:
    return models_root / BUILDING_DIR / f"{name}.json"


def is_ready(models_root: Path, name: str) -> bool:
    return (models_root / name / "config.json").is_file()


def mark_building(models_root: Path, name: str, error: str | None = None) -> None:
    """Writes (or replaces) the marker whole, so a reader never sees half of it."""
    record: dict[str, Any] = {"name": name, "pid": os.getpid(),
                              "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if error is not None:
        record["error"] = error
    path = marker_path(models_root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the API may run as another user
    os.replace(tmp, path)


def clear_building(models_root: Path, name: str) -> None:
    marker_path(models_root, name).unlink(missing_ok=True)


def building(models_root: Path) -> dict[str, dict[str, Any]]:
    """name -> marker of the models being built (or whose build failed) that have no finished folder yet."""
    folder = models_root / BUILDING_DIR
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        name = path.stem
        if name.startswith(".") or is_ready(models_root, name):
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # removed while read: the build just ended
        if isinstance(record, dict):
            found[name] = record
    return found
