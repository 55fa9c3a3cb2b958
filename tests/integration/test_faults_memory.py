"""A worker killed for memory, for real: the worker runs in a memory cgroup of its own, the kernel's OOM killer
ends it mid-job, and the test restarts it as a supervisor (Docker's restart policy, systemd) would.

Once, the job is re-delivered and resumes from its checkpoint. A job that needs more memory than its worker has
kills it on every attempt: after JOB_MAX_ATTEMPTS it ends `failed` with `out_of_memory` instead of killing one
worker after another, and the worker goes on to the next job.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prunekit.core import lifecycle
from prunekit.core.config import Settings
from prunekit.core.db.session import session_scope
from tests.conftest import ROOT, wait_for
from tests.integration.conftest import Service, kill_process
from tests.integration.test_reliability import (  # noqa: F401 (fixtures used by name)
    QUICK,
    db,
    ended,
    job_row,
    make_service,
    new_job,
    new_tenant,
    submit,
    tiny_llama_8,
    wait_for_status,
)

MIB = 1 << 20


def test_a_job_abandoned_on_its_last_attempt_is_given_up_not_claimed(db: Settings) -> None:  # noqa: F811
    """The claim and the give-up themselves, on Postgres and SQLite: a lease of -1 s is one whose worker died."""
    job_id = new_job(db, new_tenant(db))
    for attempt in (1, 2):
        with session_scope(db) as session:
            claimed = lifecycle.claim(session, job_id, f"w{attempt}", -1, 2, max_attempts=2)
        assert isinstance(claimed, lifecycle.Claimed) and claimed.attempt == attempt
    with session_scope(db) as session:
        assert lifecycle.claim(session, job_id, "w3", 60, 2, max_attempts=2) == "exhausted"
    with session_scope(db) as session:  # a bound, not a mark: with one more attempt allowed, it is taken
        claimed = lifecycle.claim(session, job_id, "w3", -1, 2, max_attempts=3)
    assert isinstance(claimed, lifecycle.Claimed) and claimed.attempt == 3
    with session_scope(db) as session:
        assert lifecycle.give_up(session, job_id, 4) is None  # it has an attempt left
        ended = lifecycle.give_up(session, job_id, 3)
    assert ended is not None and ended.status == "failed"
    job = job_row(db, job_id)
    assert job.status == "failed" and job.error["code"] == "out_of_memory" and job.lease_owner is None
    assert "each of its 3 attempts" in job.error["message"], job.error
    with session_scope(db) as session:  # once: a second worker with the same message finds it ended
        assert lifecycle.give_up(session, job_id, 3) is None
        assert lifecycle.claim(session, job_id, "w4", 60, 2, max_attempts=3) == "skipped"


class MemoryCgroup:
    """A memory cgroup (v1, or v2 where that is what the machine has) that processes are started in."""

    def __init__(self, path: Path, v2: bool) -> None:
        self.path, self.v2 = path, v2

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def limit(self, limit_bytes: int) -> None:
        (self.path / ("memory.max" if self.v2 else "memory.limit_in_bytes")).write_text(str(limit_bytes))

    def unlimit(self) -> None:
        (self.path / ("memory.max" if self.v2 else "memory.limit_in_bytes")).write_text("max" if self.v2 else "-1")

    def usage(self) -> int:
        return int(self._read("memory.current" if self.v2 else "memory.usage_in_bytes"))

    def anon(self) -> int:
        """Memory that only a kill frees (no swap here): file pages, the libraries' code included, can be evicted."""
        stat = dict(line.split() for line in self._read("memory.stat").splitlines())
        return int(stat["anon" if self.v2 else "total_rss"])

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer ended in this cgroup: the kernel's word, not ours."""
        lines = self._read("memory.events" if self.v2 else "memory.oom_control").split("\n")
        return next(int(line.split()[1]) for line in lines if line.startswith("oom_kill "))

    def pids(self) -> list[int]:
        return [int(pid) for pid in self._read("cgroup.procs").split()]

    def command(self, argv: list[str]) -> list[str]:
        """argv, started inside this cgroup from its first instruction (so every page it touches is charged here)."""
        return ["sh", "-c", f'echo $$ > {self.path / "cgroup.procs"} && exec "$@"', "sh", *argv]


@contextmanager
def memory_cgroup() -> Iterator[MemoryCgroup]:
    """A fresh memory cgroup, removed afterwards with whatever still runs in it (only what the test started)."""
    v1 = Path("/sys/fs/cgroup/memory")
    if v1.is_dir():
        # Under this process's own memory cgroup, so that its memory still counts where the machine counts ours.
        own = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if line.split(":", 2)[1] == "memory")
        parent = v1 / own.lstrip("/")
    else:  # v2: processes may only sit in leaves, so beside this process's cgroup, under the root
        parent = Path("/sys/fs/cgroup")
    group = MemoryCgroup(parent / f"prunekit-test-{secrets.token_hex(4)}", v2=not v1.is_dir())
    group.path.mkdir()
    try:
        if not group.v2:
            (group.path / "memory.swappiness").write_text("0")  # killed when full, never swapped out
        yield group
    finally:
        for pid in group.pids():
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not group.pids(), 30, "the cgroup's processes to end")
        deadline = time.monotonic() + 30
        while True:
            try:
                group.path.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def start_worker_in(service: Service, group: MemoryCgroup, name: str = "worker") -> subprocess.Popen[bytes]:
    """`prunekit worker` in the cgroup, as conftest.start_process starts it elsewhere; stop_service stops it."""
    out = (service.logs / f"{name}.log").open("ab")
    proc = subprocess.Popen(group.command([sys.executable, "-m", "prunekit", "worker"]), env=service.env, cwd=ROOT,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    service.processes[name] = proc
    return proc


class Supervisor:
    """Starts the worker again whenever it dies, as `restart: unless-stopped` does, and keeps its exit codes."""

    def __init__(self, service: Service, group: MemoryCgroup) -> None:
        self.service, self.group = service, group
        self.exits: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> Supervisor:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            code = self.service.processes["worker"].poll()
            if code is not None:
                self.exits.append(code)
                start_worker_in(self.service, self.group)


def events(service: Service, job_id: str) -> list[dict[str, Any]]:
    return service.http.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]


def move_worker_into(service: Service, group: MemoryCgroup) -> None:
    """The service's worker replaced by one inside the cgroup (the first was started outside it)."""
    kill_process(service, "worker", signal.SIGTERM)  # idle: a warm shutdown returns at once
    start_worker_in(service, group)


def test_a_worker_killed_for_memory_resumes_its_job_from_the_checkpoint(make_service: Callable[..., Service],  # noqa: F811
                                                                         tiny_llama_8: str) -> None:  # noqa: F811
    service = make_service()
    with memory_cgroup() as group:
        move_worker_into(service, group)
        body = {"model": tiny_llama_8, "method": "wanda", "sparsity": 0.5,
                "calibration": {"num_samples": 64, "seq_len": 256}, "evaluation": {"num_samples": 16, "seq_len": 256}}
        job_id = submit(service, body)
        wait_for_status(service, [job_id], lambda j: (j["progress"] or {}).get("stage") == "pruning"
                        and j["progress"]["done"] >= 2, 180, "two blocks pruned")

        # Memory runs short mid-job: the worker's cgroup is capped just above what it holds, and something else in
        # it fills shared memory (tmpfs: neither reclaimable without swap nor a process to kill) beyond what the
        # worker's anonymous memory leaves. The kernel's OOM killer ends the biggest process there: the worker.
        worker = service.processes["worker"]
        limit = group.usage() + 64 * MIB
        group.limit(limit)
        grab_mib = (limit - group.anon()) // MIB + 64
        shm = Path(f"/dev/shm/prunekit-test-{secrets.token_hex(4)}")
        try:
            # Under load the killer may pick the filler itself (its file keeps what it wrote): fill again, appending,
            # until the worker is the one it ends.
            for _ in range(3):
                subprocess.run(group.command(["dd", "if=/dev/zero", f"of={shm}", "bs=1M", f"count={grab_mib}",
                                              "oflag=append", "conv=notrunc", "status=none"]), timeout=60)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.wait(5)
                if worker.poll() is not None:
                    break
            assert worker.wait(60) == -signal.SIGKILL
            assert group.oom_kills() >= 1
        finally:
            shm.unlink(missing_ok=True)
        group.unlimit()  # the pressure is gone

        start_worker_in(service, group)  # the supervisor's restart
        [job] = wait_for_status(service, [job_id], ended, 240, "the end of the resumed job")
    assert job["status"] == "succeeded", job["error"]
    log = events(service, job_id)
    starts = [e for e in log if e["message"].startswith("Job started")]
    assert [e["data"]["attempt"] for e in starts] == [1, 2], starts
    [resumed] = [e for e in log if e["message"].startswith("Resumed from block")]
    assert 2 <= resumed["data"]["block"] < 8, resumed
    pruned = [e["data"]["done"] for e in log if e["message"].startswith("Pruned block")]
    assert pruned[-(8 - resumed["data"]["block"]):] == list(range(resumed["data"]["block"] + 1, 9))


# A job that needs far more memory than the worker has: the hidden states of its calibration windows alone are
# 1024 x 2048 x 64 numbers (256 or 512 MiB, twice: a block's inputs and outputs), where the worker is given 256 MiB
# over what it holds once it has run a small job.
GREEDY = {"model": "local:tiny-llama", "method": "wanda", "sparsity": 0.5,
          "calibration": {"num_samples": 1024, "seq_len": 2048}, "evaluation": {"num_samples": 4, "seq_len": 64}}


def test_a_job_that_kills_its_worker_every_time_ends_out_of_memory(make_service: Callable[..., Service]) -> None:  # noqa: F811
    # The embedded stack: SQLite, its broker and a local folder, the same on any machine.
    service = make_service("embedded", JOB_MAX_ATTEMPTS="2")
    with memory_cgroup() as group:
        move_worker_into(service, group)
        small = submit(service, QUICK)
        [job] = wait_for_status(service, [small], ended, 180, "the small job")
        assert job["status"] == "succeeded", job["error"]
        group.limit(group.anon() + 256 * MIB)  # the file pages it reads can be evicted to make room

        with Supervisor(service, group) as supervisor:
            greedy = submit(service, GREEDY)
            [job] = wait_for_status(service, [greedy], ended, 300, "the greedy job to end")
            assert job["status"] == "failed", job
            assert job["error"]["code"] == "out_of_memory", job["error"]
            assert "2 attempts" in job["error"]["message"], job["error"]
            # Both attempts were the kernel's doing, and no third worker was sacrificed.
            assert supervisor.exits == [-signal.SIGKILL] * 2, supervisor.exits
            assert group.oom_kills() == 2
            starts = [e for e in events(service, greedy) if e["message"].startswith("Job started")]
            assert [e["data"]["attempt"] for e in starts] == [1, 2], starts

            # The worker the supervisor brought back serves the next job.
            after = submit(service, QUICK)
            [job] = wait_for_status(service, [after], ended, 180, "the job after")
            assert job["status"] == "succeeded", job["error"]
            assert supervisor.exits == [-signal.SIGKILL] * 2 and group.oom_kills() == 2
