"""Faults of the database's side, against whole services: Postgres restarted while a job prunes, and two workers
whose clocks disagree by minutes (leases are decided on the database's clock, so neither matters)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from prunekit.core.db.models import Job, JobEvent
from prunekit.core.db.session import session_scope
from tests.conftest import wait_for
from tests.integration import test_reliability
from tests.integration.conftest import Service, kill_process, start_process
from tests.integration.test_reliability import (
    SLOW,
    assert_one_set_of_artifacts,
    ended,
    postgres_stopped,
    settings_of,
    submit,
    wait_for_status,
)

# The fixtures of the reliability tests, under their own names so that tests here ask for them.
make_service = test_reliability.make_service
tiny_llama_8 = test_reliability.tiny_llama_8


def job_events(service: Service, job_id: str) -> list[JobEvent]:
    with session_scope(settings_of(service)) as session:
        return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def job_row(service: Service, job_id: str) -> Job:
    with session_scope(settings_of(service)) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def pruning(done_at_least: int) -> Callable[[dict[str, Any]], bool]:
    return lambda j: (j.get("progress") or {}).get("stage") == "pruning" and j["progress"]["done"] >= done_at_least


# --- Postgres restarted while a job prunes ---------------------------------------------------------------------


def test_a_job_survives_a_postgres_restart_in_its_pruning_stage(make_service: Callable[..., Service],
                                                                tiny_llama_8: str) -> None:
    """The database goes away for several seconds (longer than the lease) while the job is between blocks: its
    progress writes and heartbeats wait for it, and the job ends `succeeded` with one set of artifacts."""
    service = make_service()  # JOB_LEASE_S=3: the outage outlasts the lease
    job_id = submit(service, SLOW | {"model": tiny_llama_8, "calibration": {"num_samples": 64, "seq_len": 256}})
    wait_for_status(service, [job_id], pruning(1), 180, "the first block pruned")
    block_started = time.monotonic()
    wait_for_status(service, [job_id], pruning(2), 120, "the second block pruned")
    # Down for longer than the lease and than two blocks take, so that the job's next progress write (after the
    # block it is pruning) and a few heartbeats find the database gone.
    outage_s = max(6.0, 2 * (time.monotonic() - block_started) + 2)
    with postgres_stopped():
        time.sleep(outage_s)
    [job] = wait_for_status(service, [job_id], ended, 240, "the end of the job")
    assert job["status"] == "succeeded", f"{job['error']}{service.log_tail()}"
    assert_one_set_of_artifacts(service, job_id)
    events = job_events(service, job_id)
    # The attempt that was running waited for the database and carried on: no second attempt, no fresh start.
    assert len([e for e in events if e.message.startswith("Job started")]) == 1, [e.message for e in events]
    [waited] = [e for e in events if e.message.startswith("The database could not be reached")]
    assert waited.level == "warning" and waited.data["database_unreachable_s"] > 0, waited.data
    for process in service.processes.values():
        assert process.poll() is None, service.log_tail()


# --- two workers whose clocks differ by minutes ----------------------------------------------------------------

FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")  # Debian's libfaketime (.ci/run installs it)
SKEW_S = 300  # five minutes: a hundred leases of the tests' 3 s
TAKEOVER_S = 60  # a lease (3 s), a reconcile round (1 s), a claim and a resume, with room; far below SKEW_S


def long_job(model: str, num_samples: int = 64) -> dict[str, Any]:
    return SLOW | {"model": model, "calibration": {"num_samples": num_samples, "seq_len": 256}}


def skewed(service: Service, offset_s: int) -> Service:
    """The service as seen by a process whose wall clock is `offset_s` off (libfaketime, inherited by its children;
    the monotonic clock that timers use is left alone). What it starts is stopped with the service."""
    assert FAKETIME.exists(), "libfaketime is missing: apt-get install faketime libfaketime"
    env = {**service.env, "LD_PRELOAD": str(FAKETIME), "FAKETIME": f"{offset_s:+d}",
           "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    # The skew is real: a process started with this environment reads a clock that far off.
    read = subprocess.run([sys.executable, "-c", "import time; print(time.time())"], env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    assert abs(float(read.stdout) - time.time() - offset_s) < 10, (read.stdout, time.time(), offset_s)
    return dataclasses.replace(service, env=env)  # shares `processes`: stop_service stops it too


def wait_for_worker(service: Service, name: str, offset_s: int) -> None:
    """Until the worker's Celery says it is ready (its reconciler runs from then on); its log's own timestamps show
    that the worker process itself runs on the skewed clock."""
    log = service.logs / f"{name}.log"

    def ready_line() -> str | None:
        return next((line for line in log.read_text(errors="replace").splitlines() if " ready." in line), None)

    wait_for(lambda: ready_line() is not None, 90, f"worker {name}")
    line = ready_line()
    assert line is not None
    logged = datetime.fromisoformat(json.loads(line)["ts"].replace("Z", "+00:00"))
    assert abs((logged - datetime.now(UTC)).total_seconds() - offset_s) < 60, (line, offset_s)


def starts(service: Service, job_id: str) -> list[JobEvent]:
    return [e for e in job_events(service, job_id) if e.message.startswith("Job started")]


def test_a_worker_whose_clock_is_minutes_ahead_never_takes_a_live_job(make_service: Callable[..., Service],
                                                                      tiny_llama_8: str) -> None:
    """To a clock five minutes ahead every lease the holder renews looks expired; on the database's clock it is
    live, so the second worker leaves the job alone for as long as the holder heartbeats."""
    service = make_service()  # its worker runs on this machine's clock, as the database does
    # Four times the calibration of the takeover test: the job must outlast the second worker's start by 10 s
    # and more, on a fast machine too.
    job_id = submit(service, long_job(tiny_llama_8, num_samples=256))
    wait_for_status(service, [job_id], lambda j: j["status"] == "running", 120, "the job running")
    holder = job_row(service, job_id).lease_owner
    assert holder is not None
    start_process(skewed(service, SKEW_S), "ahead", "worker")
    wait_for_worker(service, "ahead", SKEW_S)
    watched_from = time.monotonic()
    owners: set[str | None] = set()
    deadline = watched_from + 300
    while time.monotonic() < deadline:
        row = job_row(service, job_id)
        if row.status != "running":
            break
        owners.add(row.lease_owner)
        time.sleep(0.3)
    watched_s = time.monotonic() - watched_from
    assert watched_s > 10, f"the job ended {watched_s:.1f} s after the second worker was ready: nothing was tested"
    assert owners == {holder}, f"the lease changed hands: {owners}{service.log_tail()}"
    [job] = wait_for_status(service, [job_id], ended, 60, "the end of the job")
    assert job["status"] == "succeeded", job["error"]
    assert [e.data["worker"] for e in starts(service, job_id)] == [holder]
    assert job_row(service, job_id).attempts == 1
    assert_one_set_of_artifacts(service, job_id)


def test_a_job_whose_worker_ran_minutes_ahead_is_taken_over_once_its_lease_runs_out(
        make_service: Callable[..., Service], tiny_llama_8: str) -> None:
    """The holder's clock is five minutes ahead: had it written its leases on its own clock, they would outlive it
    by five minutes. Written on the database's clock, the job is taken over a lease after its holder died."""
    service = make_service()
    kill_process(service, "worker")  # idle: the job is to run on the worker ahead
    start_process(skewed(service, SKEW_S), "ahead", "worker")
    wait_for_worker(service, "ahead", SKEW_S)
    job_id = submit(service, long_job(tiny_llama_8))
    wait_for_status(service, [job_id], pruning(2), 180, "two blocks pruned")  # a checkpoint to resume from
    # Killed at once: the job takes seconds, so a holder left alive while the successor starts may finish it
    # first, and then there is nothing to take over.
    kill_process(service, "ahead")
    killed_at = time.monotonic()
    [first] = starts(service, job_id)
    assert job_row(service, job_id).status == "running", "the job ended before its holder was killed"
    start_process(service, "successor", "worker")
    wait_for_worker(service, "successor", 0)
    try:
        wait_for(lambda: len(starts(service, job_id)) == 2, TAKEOVER_S, "a second attempt")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {job_row(service, job_id).lease_expires_at=}{service.log_tail()}") from exc
    print(f"taken over {time.monotonic() - killed_at:.1f} s after the kill")
    [job] = wait_for_status(service, [job_id], ended, 240, "the end of the resumed job")
    assert job["status"] == "succeeded", job["error"]
    _, second = starts(service, job_id)
    assert second.data["attempt"] == 2 and second.data["worker"] != first.data["worker"]
    assert any(e.message.startswith("Resumed from block") for e in job_events(service, job_id))
    assert_one_set_of_artifacts(service, job_id)
