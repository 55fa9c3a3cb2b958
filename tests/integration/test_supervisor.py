"""`prunekit up` as a supervisor, on Postgres and Redis: a worker killed mid-job is started again and the job resumes
from its checkpoint, while the API goes on; and the vision-language demo models are built in the background, listed
as not ready until then, and can be pruned tower by tower.

One `prunekit up` serves the module. Its models root holds small stand-ins for the demo models' ingredients (the
tiny Llama as `smollm2-135m`, a tiny CLIP as `digits-clip`), so the background build of `llava-smollm2` runs the
real builder in seconds; `make run` builds the real ones (digits-clip trains for minutes).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from prunekit.core import lifecycle
from prunekit.core.config import Settings
from prunekit.core.db.session import session_scope
from tests.conftest import REDIS_URL, free_port, wait_for
from tests.integration.conftest import fresh_database
from tests.integration.test_reliability import db, job_row, new_job, new_tenant  # noqa: F401 (db: a fixture)

MAIN_MODEL = "tiny-llama-12"  # 12 blocks: time to kill the worker after a few are checkpointed, and some left


@dataclass
class Up:
    proc: subprocess.Popen[str]
    var: Path
    base_url: str
    lines: list[str] = field(default_factory=list)

    @property
    def http(self) -> httpx.Client:
        key = (self.var / "dev-api-key").read_text().strip()
        return httpx.Client(base_url=self.base_url, timeout=30, headers={"Authorization": f"Bearer {key}"})

    def pid(self, name: str) -> int:
        return int((self.var / "run" / f"{name}.pid").read_text())

    def output(self) -> str:
        return "\n".join(self.lines)

    def logs(self, chars: int = 4000) -> str:
        return "".join(f"\n--- {p.name} ---\n{p.read_text(errors='replace')[-chars:]}"
                       for p in sorted((self.var / "log").glob("*.log")))

    def wait_line(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [line for line in list(self.lines) if text in line]
            if found:
                return found[0]
            assert self.proc.poll() is None, f"prunekit up exited:\n{self.output()}{self.logs()}"
            time.sleep(0.2)
        raise AssertionError(f"no line with {text!r} after {timeout_s} s:\n{self.output()}{self.logs()}")


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[Up]:
    from prunekit.fixtures.demo_models import build_tiny_clip, build_tiny_llama

    tmp = tmp_path_factory.mktemp("up")
    root = tmp / "models"
    root.mkdir()
    shutil.copytree(models_root / "tiny-llama", root / "tiny-llama")
    shutil.copytree(models_root / "tiny-llama", root / "smollm2-135m")  # the language tower's stand-in
    build_tiny_clip(root / "digits-clip")  # the vision tower's stand-in
    build_tiny_llama(root / MAIN_MODEL, layers=12)
    queue = f"prunekit-up-{secrets.token_hex(4)}"
    port = free_port()
    with fresh_database() as database_url:
        env = {**os.environ, "PRUNEKIT_VAR_DIR": str(tmp / "var"), "MODELS_ROOT": str(root),
               "DATABASE_URL": database_url, "BROKER_URL": REDIS_URL, "QUEUE_NAME": queue,
               "API_HOST": "127.0.0.1", "API_PORT": str(port), "DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
               "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "prunekit", "up", "--model", f"local:{MAIN_MODEL}",
             "--demo-models", "tiny-llama,smollm2-135m,digits-clip,llava-smollm2"],
            cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        running = Up(proc, tmp / "var", f"http://127.0.0.1:{port}")
        reader = threading.Thread(target=lambda: running.lines.extend(line.rstrip("\n") for line in proc.stdout),
                                  daemon=True)
        reader.start()
        try:
            yield running
        finally:
            children = [p for p in (tmp / "var" / "run").glob("*.pid")]
            pids = [int(p.read_text()) for p in children]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # stops as Ctrl-C does: every child with it
            try:
                assert proc.wait(60) == 0, running.output()
                for pid in pids:  # nothing outlives it
                    wait_for(lambda pid=pid: not _alive(pid), 30, f"process {pid} to end")
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                redis.Redis.from_url(REDIS_URL).delete(queue, f"{queue}-webhooks")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (ended, not yet reaped by its parent) counts as ended.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _main_job(up: Up) -> dict[str, Any]:
    line = up.wait_line("main job job_", 180)
    job_id = line.split("main job ", 1)[1].split(":", 1)[0]
    with up.http as http:
        return http.get(f"/v1/jobs/{job_id}").json()


def test_a_killed_worker_is_restarted_and_its_job_resumes_from_its_checkpoint(up: Up) -> None:
    job = _main_job(up)
    api_pid, worker_pid = up.pid("api"), up.pid("worker")
    with up.http as http:
        deadline = time.monotonic() + 240
        while True:
            progress = http.get(f"/v1/jobs/{job['id']}").json()["progress"] or {}
            if progress.get("stage") == "pruning" and progress["done"] >= 3:
                break
            assert time.monotonic() < deadline, f"no pruning progress: {progress}\n{up.output()}{up.logs()}"
            time.sleep(0.1)
    os.kill(worker_pid, signal.SIGKILL)
    killed_at = time.monotonic()

    # The supervisor says so, starts a new worker after its back-off, and the API is the same process all along.
    up.wait_line(f"worker (pid {worker_pid}) killed by SIGKILL; restarting it in 1 s; its job {job['id']} resumes", 30)
    up.wait_line("worker started again", 30)
    assert up.pid("worker") != worker_pid and _alive(up.pid("worker"))
    assert up.pid("api") == api_pid and _alive(api_pid)

    up.wait_line(f"main job {job['id']} succeeded", 300)
    with up.http as http:
        done = http.get(f"/v1/jobs/{job['id']}").json()
        events = http.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
    assert done["status"] == "succeeded", done["error"]
    [stopped] = [e for e in events if e["message"].startswith("The worker running this job stopped")]
    assert stopped["level"] == "warning" and stopped["data"]["worker_exit"] == "killed by SIGKILL", stopped
    starts = [e for e in events if e["message"].startswith("Job started")]
    assert [s["data"]["attempt"] for s in starts] == [1, 2], starts
    [resumed] = [e for e in events if e["message"].startswith("Resumed from block")]
    assert 3 <= resumed["data"]["block"] < 12, resumed
    # Taken over at once, not a lease (JOB_LEASE_S, 60 s) plus a reconcile round later: the supervisor released it.
    taken_over_s = _seconds_between(stopped, starts[1])
    print(f"the job was taken up again {taken_over_s:.1f} s after the worker died "
          f"({time.monotonic() - killed_at:.0f} s to the job's end)")
    assert taken_over_s < 50, (stopped, starts[1])
    # The terminal: our lines, the result table and where to go; the service's logs in var/log.
    text = up.output()
    assert "achieved sparsity" in text and "Where to go next:" in text and "/dashboard/" in text, text
    assert not [line for line in up.lines if line.lstrip().startswith("{")], text
    assert '"message": "worker (pid' not in text
    assert '"logger": "celery' in (up.var / "log" / "worker.log").read_text()
    assert "GET /v1/jobs/" in (up.var / "log" / "api.log").read_text()  # the access log, out of the terminal


def _seconds_between(first: dict[str, Any], second: dict[str, Any]) -> float:
    from datetime import datetime

    def at(event: dict[str, Any]) -> float:
        value = event["created_at"]
        return float(value) if isinstance(value, int | float) else datetime.fromisoformat(value).timestamp()

    return at(second) - at(first)


def test_the_vision_language_demo_models_are_built_in_the_background_and_pruned_by_tower(up: Up) -> None:
    up.wait_line("building local:llava-smollm2 in the background", 120)
    up.wait_line("local:llava-smollm2 is ready", 300)
    marker = up.var.parent / "models" / ".building" / "llava-smollm2.json"
    assert not marker.exists()
    with up.http as http:
        listed = {m["ref"]: m for m in http.get("/v1/models").json()["data"]}
        llava = listed["local:llava-smollm2"]
        assert llava["ready"] and llava["family"] == "llava" and set(llava["towers"]) >= {"vision", "language"}
        body = {"model": "local:llava-smollm2", "method": "wanda", "sparsity": 0.5,
                "targets": {"vision": 0.4, "language": 0.5},
                "calibration": {"dataset": "builtin:digits", "num_samples": 4},
                "evaluation": {"perplexity": True, "num_samples": 4, "seq_len": 64}}
        created = http.post("/v1/jobs", json=body)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        deadline = time.monotonic() + 300
        while (job := http.get(f"/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, f"{job['status']} {job['progress']}{up.logs()}"
            time.sleep(0.5)
    assert job["status"] == "succeeded", f"{job['error']}{up.logs()}"
    assert job["metrics"]["sparsity"]["targets"] == {"vision": 0.4, "language": 0.5}, job["metrics"]["sparsity"]


def test_a_dead_workers_jobs_get_an_event_and_their_leases_expire_at_once(db: Settings) -> None:  # noqa: F811
    """What the supervisor does when it sees a worker die, on Postgres and SQLite: only that process's jobs."""
    tenant = new_tenant(db)
    dead, other, lookalike = (new_job(db, tenant) for _ in range(3))
    prefix = lifecycle.owner_prefix("host_1", 123)
    for job_id, owner in ((dead, f"{prefix}abc"), (other, "host_1:1234:abc"), (lookalike, "hostx1:123:abc")):
        with session_scope(db) as session:
            assert isinstance(lifecycle.claim(session, job_id, owner, 600, 10), lifecycle.Claimed)
    with session_scope(db) as session:
        assert lifecycle.worker_died(session, prefix, "killed by SIGKILL", 2.0) == [dead]
    with session_scope(db) as session:  # at once: a lease of 600 s, taken over without waiting for it
        assert isinstance(lifecycle.claim(session, dead, "successor", 600, 10), lifecycle.Claimed)
        assert lifecycle.claim(session, other, "successor", 600, 10) == "skipped"
        assert lifecycle.claim(session, lookalike, "successor", 600, 10) == "skipped"
    assert job_row(db, dead).attempts == 2
    with session_scope(db) as session:
        events = [e.message for e in lifecycle.queries.list_events(session, dead, None, 100)[0]]
        assert lifecycle.worker_died(session, prefix, "killed by SIGKILL", 2.0) == []  # now another's
    assert any(m.startswith("The worker running this job stopped (killed by SIGKILL)") for m in events), events
