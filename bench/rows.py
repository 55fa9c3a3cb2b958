"""The benchmarks' driver: one fresh process per configuration (so that its peak RSS is its own), its row(s) read
from the child's last line of stdout and stored in a results file as soon as they are in, so an interrupted run
keeps what it finished.

A results file is a list of rows; a row is identified by its configuration and its `protocol` object (sizes,
seed, dataset, dtype...). The commit is recorded but never compared. Rows are stored by re-reading the file just
before writing it, so two benchmarks that share a file (bench/allocation.py adds to quality-smollm2.json) or two
runs of one benchmark never drop each other's rows.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common import ROOT, write_json

Row = dict[str, Any]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def key(row: Row) -> str:
    return json.dumps([row.get("config"), row.get("protocol")], sort_keys=True)


def load(dest: Path) -> list[Row]:
    return json.loads(dest.read_text()) if dest.is_file() else []


def store(dest: Path, new: Sequence[Row], order: Sequence[str] = ()) -> list[Row]:
    """Adds `new` to the file, replacing rows with the same key; rows whose config is in `order` are sorted by it
    (a re-run row goes back to its place) and come first, the others keep theirs. Returns the file's rows."""
    replaced = {key(row) for row in new}
    # Several benchmarks may run side by side and store into one file: the read and the write are one step.
    with (dest.parent / f".{dest.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = [row for row in load(dest) if key(row) not in replaced] + list(new)
        place = {name: index for index, name in enumerate(order)}
        rows.sort(key=lambda row: place.get(row.get("config"), len(place)))
        write_json(dest, rows)
    return rows


def drive(script: str, jobs: Sequence[str], dest: Path, protocol: dict[str, Any], commit: str, *,
          child_args: Sequence[str] = (), order: Sequence[str] = (), describe: Callable[[Row], str] = lambda _: "",
          after_store: Callable[[list[Row]], None] | None = None) -> list[str]:
    """Runs `script --one JOB *child_args` for each job in a fresh process; a child prints one row, or a list of
    rows (one job measuring several configurations), as JSON on its last line. Each row gets the commit and the
    protocol and is stored in `dest` at once. A failed job is logged and the others go on; returns the failed."""
    failed = []
    for job in jobs:
        log(f"{job}: running")
        start = time.perf_counter()
        child = subprocess.run([sys.executable, script, "--one", job, *child_args], stdout=subprocess.PIPE,
                               text=True, cwd=ROOT)
        if child.returncode != 0:
            log(f"{job}: FAILED (exit {child.returncode}); the others go on")
            failed.append(job)
            continue
        output = json.loads(child.stdout.strip().splitlines()[-1])
        new = [{**row, "commit": commit, "protocol": protocol}
               for row in (output if isinstance(output, list) else [output])]
        rows = store(dest, new, order)
        if after_store is not None:
            after_store(rows)
        for row in new:
            log(f"{row['config']}: {describe(row)}")
        log(f"{job}: done in {time.perf_counter() - start:.0f} s")
    log(f"results in {dest}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return failed


def pending(names: Sequence[str], dest: Path, protocol: dict[str, Any]) -> list[str]:
    """The configurations the file does not hold yet under this protocol (the others are logged as skipped)."""
    done = {key(row) for row in load(dest)}
    todo = []
    for name in names:
        if key({"config": name, "protocol": protocol}) in done:
            log(f"{name}: already in {dest.name}, skipped")
        else:
            todo.append(name)
    return todo


def choose(only: str | None, known: Sequence[str], error: Callable[[str], Any]) -> list[str]:
    """The configurations of --only (comma-separated), checked against the known ones; all of them without it."""
    names = list(known) if not only else [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        error(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return names
