"""Child processes of the `prunekit` command (API and workers under `prunekit up`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# The third-party progress bars (transformers, huggingface_hub, tqdm) are for a person watching one process; in
# a service's log file they are noise, so `prunekit up`'s children (and the builds it runs) go without them.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error",
             "PYTHONUNBUFFERED": "1"}


def spawn(args: list[str], log_path: Path | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`python -m prunekit ARGS` in a session of its own; with log_path, its stdout and stderr are appended there
    (the child's own JSON log lines, and whatever a library prints) instead of going to this terminal."""
    if log_path is None:
        return subprocess.Popen([sys.executable, "-m", "prunekit", *args], start_new_session=True,
                                env={**os.environ, **(env or {})})
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:  # the child holds its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "prunekit", *args], start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **QUIET_ENV, **(env or {})})


def stop(processes: list[subprocess.Popen[bytes]], timeout_s: float = 20.0) -> None:
    for proc in processes:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in processes:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(5)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended between the check and the signal
        os.killpg(proc.pid, sig)


def exit_description(returncode: int) -> str:
    """What a child's exit status means, for a person: "killed by SIGKILL" rather than -9."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"
