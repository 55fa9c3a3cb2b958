"""The database is the source of truth: leases, the per-tenant cap and the reconciler, against real parts.

First the claim itself, on real Postgres (and SQLite); then whole services (API and worker processes, Redis,
Postgres, S3) with a worker killed, Redis and Postgres restarted, the API restarted, and the cap at 1.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import redis
from sqlalchemy import select

from prunekit.core.config import Settings
from prunekit.core.db import queries
from prunekit.core.db.models import Artifact, Job, Tenant, utcnow
from prunekit.core.db.session import migrate, session_scope
from prunekit.core.storage import make_store
from tests.conftest import REDIS_URL, wait_for
from tests.integration.conftest import (
    Service,
    fresh_database,
    kill_process,
    start_process,
    start_service,
    stop_service,
    wait_until_ready,
)
from workers.reconcile import reconcile_once, resend_due

# --- the claim, against a real database -------------------------------------------------------------------


@pytest.fixture(params=["postgres", "sqlite"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else f"sqlite:///{tmp_path / 'p.db'}"
    settings = Settings(PRUNEKIT_VAR_DIR=tmp_path, database_url=url)
    migrate(url)
    return settings


def new_tenant(settings: Settings) -> str:
    with session_scope(settings) as session:
        tenant = Tenant(id=f"ten_{secrets.token_hex(6)}", name=f"claims-{secrets.token_hex(4)}")
        session.add(tenant)
    return tenant.id


def new_job(settings: Settings, tenant_id: str) -> str:
    with session_scope(settings) as session:
        job, _ = queries.create_job(session, tenant_id, {"model": "local:x", "method": "wanda", "sparsity": 0.5},
                                    {}, None)
    return job.id


def claim(settings: Settings, job_id: str, owner: str, lease_s: float = 60, cap: int = 2) -> str:
    with session_scope(settings) as session:
        return queries.claim_job(session, job_id, owner, lease_s, cap)


def job_row(settings: Settings, job_id: str) -> Job:
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_racing_claims_of_one_job_have_exactly_one_winner(db: Settings) -> None:
    tenant = new_tenant(db)
    for _ in range(5):
        job_id = new_job(db, tenant)
        barrier = threading.Barrier(4)
        outcomes: list[str] = []

        def racer(owner: str, job_id: str, barrier: threading.Barrier, outcomes: list[str]) -> None:
            barrier.wait()
            outcomes.append(claim(db, job_id, owner, cap=100))

        threads = [threading.Thread(target=racer, args=(f"w{i}", job_id, barrier, outcomes)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(outcomes) == ["claimed", "skipped", "skipped", "skipped"]
        job = job_row(db, job_id)
        assert job.status == "running" and job.attempts == 1 and job.lease_owner in {"w0", "w1", "w2", "w3"}


def test_an_expired_lease_can_be_claimed_and_the_old_holder_can_no_longer_write(db: Settings) -> None:
    job_id = new_job(db, new_tenant(db))
    assert claim(db, job_id, "alive", lease_s=60) == "claimed"
    assert claim(db, job_id, "thief", lease_s=60) == "skipped"  # a live lease is not taken
    with session_scope(db) as session:
        assert queries.touch_lease(session, job_id, "alive", 60)

    with session_scope(db) as session:  # the holder stops heartbeating: its lease runs out
        session.get(Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=1)  # type: ignore[union-attr]
    assert claim(db, job_id, "successor") == "claimed"
    with session_scope(db) as session:
        assert not queries.touch_lease(session, job_id, "alive", 60)
        assert queries.touch_lease(session, job_id, "successor", 60)
    job = job_row(db, job_id)
    assert (job.lease_owner, job.attempts, job.status) == ("successor", 2, "running")


def test_the_cap_holds_back_a_tenants_extra_jobs_until_a_slot_frees(db: Settings) -> None:
    tenant, other_tenant = new_tenant(db), new_tenant(db)
    jobs = [new_job(db, tenant) for _ in range(3)]
    assert [claim(db, j, f"w{i}", cap=2) for i, j in enumerate(jobs)] == ["claimed", "claimed", "capped"]
    assert job_row(db, jobs[2]).status == "queued"
    assert claim(db, new_job(db, other_tenant), "w9", cap=2) == "claimed"  # the cap is per tenant

    with session_scope(db) as session:  # a dead worker's job does not hold a slot
        session.get(Job, jobs[0]).lease_expires_at = utcnow() - timedelta(seconds=1)  # type: ignore[union-attr]
    assert claim(db, jobs[2], "w2", cap=2) == "claimed"
    assert claim(db, jobs[0], "w0-again", cap=2) == "capped"


def test_concurrent_claims_of_two_jobs_respect_a_cap_of_one(db: Settings) -> None:
    """The first claim is held open while the second runs: the second must wait for it and then see it."""
    tenant = new_tenant(db)
    first, second = new_job(db, tenant), new_job(db, tenant)
    outcome: list[str] = []
    with session_scope(db) as session:
        assert queries.claim_job(session, first, "a", 60, 1) == "claimed"
        thread = threading.Thread(target=lambda: outcome.append(claim(db, second, "b", cap=1)))
        thread.start()
        time.sleep(1.0)
        assert thread.is_alive(), f"the second claim did not wait for the first one's commit: {outcome}"
    thread.join(30)
    assert outcome == ["capped"]
    assert job_row(db, second).status == "queued"


def test_resend_backs_off_as_a_job_keeps_waiting() -> None:
    now = utcnow()

    def unsent(created_s_ago: float, sent_s_ago: float | None) -> queries.Unsent:
        sent = None if sent_s_ago is None else now - timedelta(seconds=sent_s_ago)
        return queries.Unsent("job_x", "queued", now - timedelta(seconds=created_s_ago), sent)

    assert resend_due(unsent(5, None), now, 30)
    assert not resend_due(unsent(20, 20), now, 30) and resend_due(unsent(31, 31), now, 30)
    assert not resend_due(unsent(250, 100), now, 30)  # sent 150 s after creation: next one 150 s later
    assert resend_due(unsent(301, 151), now, 30)
    assert resend_due(unsent(100_000, 300), now, 30)  # never more than 10 intervals apart


def test_the_reconciler_resends_stale_queued_and_expired_jobs_and_ends_abandoned_cancels(queue_name: str,
                                                                                       tmp_path: Path) -> None:
    with fresh_database() as url:  # the reconciler looks at every job of its database
        settings = Settings(PRUNEKIT_VAR_DIR=tmp_path, database_url=url, broker_url=REDIS_URL,
                            queue_name=queue_name, reconcile_interval_s=5)
        migrate(url)
        check_reconciler(settings, queue_name)


def check_reconciler(settings: Settings, queue_name: str) -> None:
    tenant = new_tenant(settings)
    fresh, stale, dead, cancelling = (new_job(settings, tenant) for _ in range(4))
    assert claim(settings, dead, "gone", cap=10) == claim(settings, cancelling, "gone", cap=10) == "claimed"
    with session_scope(settings) as session:
        long_ago = utcnow() - timedelta(seconds=60)
        session.get(Job, stale).enqueued_at = long_ago  # type: ignore[union-attr]
        for job_id in (dead, cancelling):  # sent, then claimed, then its worker died long ago
            job = session.get(Job, job_id)
            assert job is not None
            job.enqueued_at, job.lease_expires_at = long_ago - timedelta(seconds=10), long_ago
        session.get(Job, cancelling).status = "cancel_requested"  # type: ignore[union-attr]

    report = reconcile_once(settings)
    assert set(report.resent) >= {stale, dead} and fresh not in report.resent and cancelling in report.cancelled
    assert job_row(settings, cancelling).status == "cancelled"
    messages = redis.Redis.from_url(REDIS_URL).lrange(queue_name, 0, -1)
    assert sum(stale.encode() in m for m in messages) == sum(dead.encode() in m for m in messages) == 1
    # Just re-sent: the next round leaves them alone.
    assert not {stale, dead} & set(reconcile_once(settings).resent)


def test_a_job_the_reconciler_cancels_leaves_no_files_or_artifacts(queue_name: str, tmp_path: Path) -> None:
    """A cancellation whose worker died: what that worker had stored (checkpoints, a half-finished upload, even a
    committed set of artifacts) goes with it; the tenant's other jobs and its score cache stay."""
    with fresh_database() as url:
        settings = Settings(PRUNEKIT_VAR_DIR=tmp_path, database_url=url, broker_url=REDIS_URL,
                            queue_name=queue_name, reconcile_interval_s=5)
        migrate(url)
        tenant = new_tenant(settings)
        cancelling, other = new_job(settings, tenant), new_job(settings, tenant)
        assert claim(settings, cancelling, "gone") == "claimed"
        store = make_store(settings)
        source = tmp_path / "blob"
        source.write_bytes(b"x" * 1000)
        mine = [f"{tenant}/{cancelling}/checkpoints/state.json", f"{tenant}/{cancelling}/attempt-1/config.json",
                f"{tenant}/{cancelling}/attempt-1/model.safetensors"]
        kept = [f"{tenant}/{other}/attempt-1/model.safetensors", f"{tenant}/score-cache/scores.safetensors"]
        for key in mine + kept:
            store.put_file(key, source, "application/octet-stream")
        with session_scope(settings) as session:
            job = session.get(Job, cancelling)
            assert job is not None
            job.status, job.lease_expires_at = "cancel_requested", utcnow() - timedelta(seconds=60)
            session.add(Artifact(id=f"art_{secrets.token_hex(6)}", job_id=cancelling, tenant_id=tenant,
                                 name="model.safetensors", size_bytes=1000, sha256="0" * 64,
                                 content_type="application/octet-stream", storage_key=mine[-1]))

        assert reconcile_once(settings).cancelled == [cancelling]
        assert job_row(settings, cancelling).status == "cancelled"
        assert store.list_keys(f"{tenant}/{cancelling}") == []
        assert sorted(store.list_keys(tenant)) == sorted(kept)
        with session_scope(settings) as session:
            assert queries.list_artifacts(session, cancelling) == []


def test_a_failed_job_leaves_no_files_or_artifacts(db: Settings, tmp_path: Path) -> None:
    """A job that fails takes with it what its attempts stored: checkpoints, an upload of an interrupted attempt
    and that attempt's rows (a failed job lists no artifacts)."""
    from workers.runner import execute_job

    tenant = new_tenant(db)
    with session_scope(db) as session:
        job, _ = queries.create_job(session, tenant, {"model": "local:no-such-model", "method": "wanda",
                                                      "sparsity": 0.5}, {}, None)
    store = make_store(db)
    source = tmp_path / "blob"
    source.write_bytes(b"x" * 1000)
    for key in (f"{tenant}/{job.id}/checkpoints/state.json", f"{tenant}/{job.id}/attempt-0/model.safetensors"):
        store.put_file(key, source, "application/octet-stream")
    with session_scope(db) as session:
        session.add(Artifact(id=f"art_{secrets.token_hex(6)}", job_id=job.id, tenant_id=tenant,
                             name="model.safetensors", size_bytes=1000, sha256="0" * 64,
                             content_type="application/octet-stream",
                             storage_key=f"{tenant}/{job.id}/attempt-0/model.safetensors"))

    execute_job(job.id, db)
    assert job_row(db, job.id).status == "failed"
    assert store.list_keys(f"{tenant}/{job.id}") == []
    with session_scope(db) as session:
        assert queries.list_artifacts(session, job.id) == []


# --- whole services ------------------------------------------------------------------------------------------

# A job on the tiny Llama slow enough (several seconds on CPU) to be interrupted in the middle.
SLOW = {"model": "local:tiny-llama", "method": "wanda", "sparsity": 0.5,
        "calibration": {"num_samples": 128, "seq_len": 256}, "evaluation": {"num_samples": 32, "seq_len": 256}}
QUICK = {"model": "local:tiny-llama", "method": "magnitude", "sparsity": 0.3,
         "calibration": {"num_samples": 8, "seq_len": 64}, "evaluation": {"num_samples": 4, "seq_len": 64}}
# Short leases and frequent reconciling so that recoveries happen within seconds.
FAST_RECOVERY = {"JOB_LEASE_S": "3", "RECONCILE_INTERVAL_S": "1"}


@pytest.fixture
def make_service(request: pytest.FixtureRequest, tmp_path: Path, models_root: Path) -> Iterator[
        Callable[..., Service]]:
    """Starts a service on a stack with extra settings; everything it started is stopped at the end."""
    with ExitStack() as stack:
        enter = stack.enter_context

        def make(stack: str = "postgres-redis-s3", **env: str) -> Service:
            queue = f"prunekit-rel-{secrets.token_hex(4)}"
            overrides = {"QUEUE_NAME": queue, **FAST_RECOVERY, **env}
            if stack != "embedded":
                s3 = request.getfixturevalue("s3_endpoint")
                bucket = f"prunekit-rel-{secrets.token_hex(4)}"
                boto3.client("s3", endpoint_url=s3, region_name="us-east-1").create_bucket(Bucket=bucket)
                overrides |= {"DATABASE_URL": enter(fresh_database()), "BROKER_URL": REDIS_URL,
                              "ARTIFACT_STORE": f"s3://{bucket}/artifacts", "S3_ENDPOINT_URL": s3}
            tmp = tmp_path / f"svc-{queue}"
            tmp.mkdir()
            service = start_service(overrides, tmp, models_root)
            enter(stopping(service, queue if stack != "embedded" else None))
            return service

        yield make


@contextmanager
def stopping(service: Service, redis_queue: str | None) -> Iterator[None]:
    try:
        yield
    finally:
        stop_service(service)
        if redis_queue:
            redis.Redis.from_url(REDIS_URL).delete(redis_queue)


def settings_of(service: Service) -> Settings:
    names = ("PRUNEKIT_VAR_DIR", "DATABASE_URL", "BROKER_URL", "ARTIFACT_STORE", "S3_ENDPOINT_URL", "QUEUE_NAME")
    return Settings(**{k: service.env[k] for k in names if k in service.env})


def submit(service: Service, body: dict[str, Any]) -> str:
    response = service.http.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def wait_for_status(service: Service, job_ids: list[str], done: Callable[[dict[str, Any]], bool],
                    timeout_s: float, what: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    jobs: list[dict[str, Any]] = []
    with service.http as http:
        while time.monotonic() < deadline:
            try:
                jobs = [http.get(f"/v1/jobs/{job_id}").json() for job_id in job_ids]
            except httpx.TransportError:  # the API is being restarted
                jobs = []
            if jobs and all(done(job) for job in jobs):
                return jobs
            time.sleep(0.3)
    raise AssertionError(f"{what} not reached after {timeout_s} s: "
                         f"{[(j['id'], j['status'], j['progress']) for j in jobs]}{service.log_tail()}")


def ended(job: dict[str, Any]) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


def assert_one_set_of_artifacts(service: Service, job_id: str) -> None:
    with service.http as http:
        artifacts = http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
        names = [a["name"] for a in artifacts]
        assert len(names) == len(set(names)) and {"model.safetensors", "report.json"} <= set(names)
        for artifact in artifacts:
            content = http.get(f"/v1/artifacts/{artifact['id']}/content").content
            assert hashlib.sha256(content).hexdigest() == artifact["sha256"], artifact["name"]
    settings = settings_of(service)
    with session_scope(settings) as session:
        tenant_id = session.scalar(select(Job.tenant_id).where(Job.id == job_id))
    # The store holds exactly the listed files: an interrupted attempt's uploads were removed.
    assert len(make_store(settings).list_keys(f"{tenant_id}/{job_id}")) == len(names)


def started_events(service: Service, job_id: str) -> list[dict[str, Any]]:
    events = service.http.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    return [e for e in events if e["message"].startswith("Job started")]


@pytest.mark.parametrize("stack", ["postgres-redis-s3", "embedded"])
def test_a_job_survives_its_worker_being_killed(make_service: Callable[..., Service], stack: str) -> None:
    service = make_service(stack)
    job_id = submit(service, SLOW)
    wait_for_status(service, [job_id], lambda j: j["status"] == "running" and j["progress"] is not None, 120,
                    "running with progress")
    kill_process(service, "worker")
    killed_at = time.monotonic()

    start_process(service, "worker2", "worker")
    [job] = wait_for_status(service, [job_id], ended, 240, "the end of the job")
    assert job["status"] == "succeeded", job["error"]
    starts = started_events(service, job_id)
    assert len(starts) == 2 and starts[1]["data"]["attempt"] == 2, starts
    assert starts[0]["data"]["worker"] != starts[1]["data"]["worker"]
    assert_one_set_of_artifacts(service, job_id)
    print(f"[{stack}] recovered and finished {time.monotonic() - killed_at:.1f} s after the kill")


@pytest.fixture
def tiny_llama_8(models_root: Path) -> str:
    """An 8-block tiny Llama: enough blocks to be killed after a few and still have some to resume."""
    from prunekit.fixtures.demo_models import build_tiny_llama

    if not (models_root / "tiny-llama-8").exists():
        build_tiny_llama(models_root / "tiny-llama-8", layers=8)
    return "local:tiny-llama-8"


def test_a_killed_job_resumes_from_its_checkpoint_to_the_same_result(make_service: Callable[..., Service],
                                                                     tiny_llama_8: str) -> None:
    service = make_service()  # checkpoints on S3; the store contract tests cover the local folder's side
    body = SLOW | {"model": tiny_llama_8, "calibration": {"num_samples": 64, "seq_len": 256}}
    job_id, job, events, resumed = killed_and_resumed(service, body)
    assert resumed["data"]["tower"] == "language" and 2 <= resumed["data"]["block"] < 8, resumed
    # The finished blocks' parameters (no hidden states: the resumed worker makes them again from those blocks).
    assert 45_000 * 4 * resumed["data"]["block"] < resumed["data"]["checkpoint_bytes"] < 64 * 256 * 64 * 4
    pruned = [e["data"]["done"] for e in events if e["message"].startswith("Pruned block")]
    assert pruned[-(8 - resumed["data"]["block"]):] == list(range(resumed["data"]["block"] + 1, 9))
    assert_one_set_of_artifacts(service, job_id)  # the checkpoints are gone with the job's end

    # The same job never interrupted: the same files, bit for bit, and the same dense perplexity.
    again = uninterrupted(service, body)
    assert again["metrics"]["perplexity"] == job["metrics"]["perplexity"]
    assert digests(service, job_id) == digests(service, again["id"]) and "model.safetensors" in digests(service, job_id)


def killed_and_resumed(service: Service, body: dict[str, Any]) -> tuple[str, dict[str, Any], list[dict[str, Any]],
                                                                         dict[str, Any]]:
    """A job whose worker is killed after two pruned blocks, resumed by another worker: its id, its end, its events
    and the resume's event."""
    job_id = submit(service, body)
    wait_for_status(service, [job_id], lambda j: (j["progress"] or {}).get("stage") == "pruning"
                    and j["progress"]["done"] >= 2, 180, "two blocks pruned")
    kill_process(service, "worker")
    start_process(service, "worker2", "worker")
    [job] = wait_for_status(service, [job_id], ended, 240, "the end of the resumed job")
    assert job["status"] == "succeeded", job["error"]
    events = service.http.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    [resumed] = [e for e in events if e["message"].startswith("Resumed from block")]
    return job_id, job, events, resumed


def uninterrupted(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    job_id = submit(service, body)
    [job] = wait_for_status(service, [job_id], ended, 240, "the end of the uninterrupted job")
    assert job["status"] == "succeeded", job["error"]
    return job


def digests(service: Service, job_id: str) -> dict[str, str]:
    artifacts = service.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    return {a["name"]: a["sha256"] for a in artifacts if a["name"] != "report.json"}  # it holds timings


@pytest.fixture
def wide_llama_8(models_root: Path) -> str:
    """8 blocks of about 2.9 MB each (width 256, fp32): with 4 MB shards, every block ends a shard of its own."""
    from prunekit.fixtures.demo_models import build_tiny_llama

    if not (models_root / "tiny-llama-8-wide").exists():
        build_tiny_llama(models_root / "tiny-llama-8-wide", layers=8, width=256)
    return "local:tiny-llama-8-wide"


def test_a_killed_streamed_job_resumes_from_its_output_shards_and_publishes_them_by_copy(
        make_service: Callable[..., Service], wide_llama_8: str) -> None:
    """Streamed from disk on S3: the checkpoint is the output's own shards, so the resumed job restores them and
    publishes every block's shard by a copy within the store; nothing is uploaded twice, and the files are those of
    a job never interrupted, bit for bit."""
    service = make_service(OUTPUT_SHARD_MB="4")
    body = SLOW | {"model": wide_llama_8, "offload": "disk", "calibration": {"num_samples": 64, "seq_len": 256},
                   "evaluation": {"num_samples": 8, "seq_len": 256}}
    job_id, job, events, resumed = killed_and_resumed(service, body)
    assert 2 <= resumed["data"]["block"] < 8, resumed
    # What it resumed from is the output's shards of the finished blocks (2.9 MB each) and state.json: no second
    # copy of a block, no hidden states.
    assert resumed["data"]["block"] * 2.9e6 < resumed["data"]["checkpoint_bytes"] < resumed["data"]["block"] * 3e6

    def stored(job_id: str) -> dict[str, Any]:
        log = service.http.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        [event] = [e for e in log if e["message"].startswith("Stored ")]
        return event

    artifacts = service.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    shards = sorted(a["name"] for a in artifacts if a["name"].startswith("model-"))
    event = stored(job_id)
    # One shard per block, then the embeddings and head: every block's shard was copied, none uploaded again.
    assert event["data"]["copied"] == shards[:8] and len(shards) > 8, event
    assert "copied within the store" in event["message"]
    for artifact in artifacts:
        content = service.http.get(f"/v1/artifacts/{artifact['id']}/content").content
        assert hashlib.sha256(content).hexdigest() == artifact["sha256"], artifact["name"]
    settings = settings_of(service)
    with session_scope(settings) as session:
        tenant_id = session.scalar(select(Job.tenant_id).where(Job.id == job_id))
    # Only the listed files remain: the checkpoint's shards went with the job's end.
    assert len(make_store(settings).list_keys(f"{tenant_id}/{job_id}")) == len(artifacts)

    again = uninterrupted(service, body)["id"]
    assert digests(service, job_id) == digests(service, again)
    assert stored(again)["data"]["copied"] == shards[:8]  # the same path with no crash at all


REDIS_START = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379", "--save", "",
               "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log"]


@contextmanager
def redis_stopped() -> Iterator[None]:
    """Redis (a shared service of this machine) is down inside the block and always started again after."""
    subprocess.run(["redis-cli", "shutdown", "nosave"], check=False, timeout=30)
    try:
        wait_for(lambda: subprocess.run(["redis-cli", "ping"], capture_output=True).returncode != 0, 20,
                 "Redis to stop")
        yield
    finally:
        subprocess.run(REDIS_START, check=False, timeout=30)
        wait_for(lambda: redis.Redis.from_url(REDIS_URL).ping(), 60, "Redis to start again")


def test_no_job_is_lost_when_redis_restarts(make_service: Callable[..., Service]) -> None:
    service = make_service()
    jobs = [submit(service, SLOW)] + [submit(service, QUICK) for _ in range(3)]
    wait_for_status(service, jobs[:1], lambda j: j["status"] == "running" and j["progress"] is not None, 120,
                    "the first job running")
    with redis_stopped():  # Redis keeps nothing on disk: the queued messages vanish
        time.sleep(2)
        while_down = submit(service, QUICK)  # the API answers; the database row waits to be re-sent
    done = wait_for_status(service, [*jobs, while_down], ended, 300, "every job ended")
    assert [j["status"] for j in done] == ["succeeded"] * 5, [(j["id"], j["error"]) for j in done]


@contextmanager
def postgres_stopped() -> Iterator[None]:
    """Postgres (a shared service of this machine) is down inside the block and always started again after.
    Other sessions lose their connections meanwhile, so the block is kept short."""
    cluster = ["pg_ctlcluster", "--skip-systemctl-redirect", os.listdir("/etc/postgresql")[0], "main"]
    subprocess.run([*cluster, "stop", "-m", "fast"], check=True, timeout=60)
    try:
        yield
    finally:
        subprocess.run([*cluster, "start"], check=False, timeout=120)
        wait_for(lambda: subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432"],
                                        capture_output=True).returncode == 0, 60, "Postgres to start again")


def test_an_api_restart_loses_nothing_and_readyz_follows_the_database(make_service: Callable[..., Service]) -> None:
    service = make_service()
    jobs = [submit(service, SLOW), submit(service, QUICK)]
    wait_for_status(service, jobs[:1], lambda j: j["status"] == "running", 120, "the first job running")
    kill_process(service, "serve", 15)  # SIGTERM, as a deploy does; the worker carries on alone
    start_process(service, "serve", "serve")
    wait_until_ready(service)
    done = wait_for_status(service, jobs, ended, 300, "both jobs ended")
    assert [j["status"] for j in done] == ["succeeded", "succeeded"], [j["error"] for j in done]
    assert_one_set_of_artifacts(service, jobs[0])

    api = service.processes["serve"]
    with postgres_stopped():
        wait_for(lambda: httpx.get(f"{service.base_url}/readyz", timeout=5).status_code == 503, 20,
                 "/readyz to report the database down")
        body = httpx.get(f"{service.base_url}/readyz", timeout=5).json()
        assert body["checks"] == {"database": False, "broker": True}
        # A request that needs the database says it is unavailable, for now: a 503 problem to retry, never a 500.
        down = service.http.get(f"/v1/jobs/{jobs[0]}")
        assert down.status_code == 503, down.text
        assert down.headers["content-type"] == "application/problem+json"
        assert down.json()["code"] == "database_unavailable" and int(down.headers["Retry-After"]) > 0
    wait_for(lambda: httpx.get(f"{service.base_url}/readyz", timeout=5).status_code == 200, 60,
             "/readyz to recover")
    assert api.poll() is None and service.processes["serve"] is api  # the same process, not restarted
    # The read pool's connections died with the database; the first read on one is retried on a new connection.
    assert service.http.get(f"/v1/jobs/{jobs[0]}").json()["status"] == "succeeded"


def test_the_cap_runs_one_job_of_a_tenant_at_a_time(make_service: Callable[..., Service]) -> None:
    service = make_service(MAX_RUNNING_JOBS_PER_TENANT="1")
    start_process(service, "worker2", "worker")
    caps = service.http.get("/v1/capabilities").json()
    assert caps["limits"]["running_jobs_per_tenant"] == 1
    jobs = [submit(service, QUICK | {"evaluation": {"num_samples": 32, "seq_len": 256}}) for _ in range(2)]
    done = wait_for_status(service, jobs, ended, 300, "both jobs ended")
    assert [j["status"] for j in done] == ["succeeded", "succeeded"], [j["error"] for j in done]
    with session_scope(settings_of(service)) as session:
        spans = sorted((job.started_at, job.finished_at) for job in session.scalars(select(Job).where(
            Job.id.in_(jobs))))
    (_, first_end), (second_start, _) = spans
    assert first_end is not None and second_start is not None and first_end <= second_start, spans


def test_connections_opened_together_spread_over_the_api_processes(make_service: Callable[..., Service]) -> None:
    """API_WORKERS=2, as docker-compose.yml runs the API: each process listens on a socket of its own, so clients
    that connect together (a deploy, a load balancer's pool) are spread over both processes; on one shared socket
    the first process to wake accepted every waiting connection and the other stayed idle."""
    service = make_service(API_WORKERS="2")
    port = int(service.base_url.rsplit(":", 1)[1])
    # /readyz answers as soon as one process listens; on a busy machine the second may still be starting.
    wait_for(lambda: len(connections_by_process(service.processes["serve"].pid, port, "0A")) == 2, 30,
             "both API processes listening")
    request = (f"GET /v1/capabilities HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Authorization: Bearer {service.api_key}\r\n\r\n").encode()
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
    try:
        for client in clients:
            client.sendall(request)
        assert all(client.recv(65536).startswith(b"HTTP/1.1 200") for client in clients)
        per_process = connections_by_process(service.processes["serve"].pid, port)
    finally:
        for client in clients:
            client.close()
    # Spread by a hash of each connection's ports: fewer than 3 of 20 on one of two sockets is a 1-in-2,500 chance.
    assert len(per_process) == 2, per_process
    assert min(per_process.values()) >= 3 and sum(per_process.values()) == 20, per_process


def connections_by_process(process_group: int, port: int, state: str = "01") -> dict[int, int]:
    """Sockets on `port` in `state` (01: established connections, 0A: listening) held by each process of a
    process group (from /proc)."""
    established = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
                established.add(fields[9])  # the socket's inode
    counts: dict[int, int] = {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            if int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2]) != process_group:
                continue
            inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:
            continue  # exited meanwhile
        if held := len(inodes & established):
            counts[pid] = held
    return counts
