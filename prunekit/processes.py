"""Child processes of the `prunekit` command (API and worker under `prunekit up`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def spawn(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "prunekit", *args], start_new_session=True)


def stop(processes: list[subprocess.Popen[bytes]], timeout_s: float = 20.0) -> None:
    for proc in processes:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in processes:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
