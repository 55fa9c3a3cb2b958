"""A running service: `prunekit serve` and `prunekit worker` as real processes, on either stack."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx
import psycopg
import pytest

from app.auth import create_key
from prunekit.core.config import Settings
from prunekit.core.db.session import engine_for, migrate, session_scope
from tests.conftest import PG_ADMIN_URL, REDIS_URL, ROOT, free_port, sqlalchemy_url, wait_for


@dataclass
class Service:
    base_url: str
    api_key: str
    env: dict[str, str]
    models_root: Path
    logs: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30, follow_redirects=True,
                            headers={"Authorization": f"Bearer {self.api_key}"})

    def log_tail(self, chars: int = 6000) -> str:
        return "".join(f"\n--- {p.name} ---\n{p.read_text(errors='replace')[-chars:]}"
                       for p in sorted(self.logs.glob("*.log")))


def start_service(env_overrides: dict[str, str], tmp: Path, models_root: Path) -> Service:
    port = free_port()
    env = {**os.environ, "PRUNEKIT_VAR_DIR": str(tmp / "var"), "MODELS_ROOT": str(models_root),
           "API_PORT": str(port), "API_HOST": "127.0.0.1", "DEVICE": "cpu", "LOG_LEVEL": "info",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "WEBHOOK_BACKOFF_S": "0.5", "WEBHOOK_ALLOW_PRIVATE_HOSTS": "true", **env_overrides}
    settings = Settings(**{k: v for k, v in env.items() if k in _SETTING_NAMES})
    migrate(settings.database_url)
    with session_scope(settings) as session:
        key = create_key(session, f"it-{secrets.token_hex(4)}")
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    service = Service(f"http://127.0.0.1:{port}", key, env, models_root, logs)
    for name, command in (("serve", "serve"), ("worker", "worker"), ("webhooks", "worker --webhooks")):
        start_process(service, name, command)
    wait_until_ready(service)
    return service


def start_process(service: Service, name: str, command: str) -> subprocess.Popen[bytes]:
    """`prunekit <command>` (serve, worker or `worker --webhooks`) with the service's environment, logged to
    logs/<name>.log; also how a test adds a second worker or brings the API back after stopping it."""
    out = (service.logs / f"{name}.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "prunekit", *command.split()], env=service.env, cwd=ROOT,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    service.processes[name] = proc
    return proc


def kill_process(service: Service, name: str, sig: int = signal.SIGKILL) -> None:
    """Stops one process of the service the hard way (SIGKILL: no clean-up runs) and forgets it."""
    proc = service.processes.pop(name)
    os.kill(proc.pid, sig)
    proc.wait(30)


def wait_until_ready(service: Service, timeout_s: float = 60) -> None:
    try:
        wait_for(lambda: httpx.get(f"{service.base_url}/readyz", timeout=2).status_code == 200, timeout_s, "API")
    except TimeoutError as exc:
        stop_service(service)
        raise AssertionError(f"{exc}{service.log_tail()}") from exc


def stop_service(service: Service) -> None:
    for proc in service.processes.values():
        if proc.poll() is None:
            proc.terminate()
    for proc in service.processes.values():
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


_SETTING_NAMES = {"PRUNEKIT_VAR_DIR", "DATABASE_URL", "BROKER_URL", "ARTIFACT_STORE", "S3_ENDPOINT_URL",
                  "MODELS_ROOT", "QUEUE_NAME"}


@contextmanager
def fresh_database() -> Iterator[str]:
    """A Postgres database for one service. One database is one deployment: a worker's reconciler re-sends
    every job of its database that waits, so services sharing one would run each other's jobs."""
    name = f"prunekit_svc_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = sqlalchemy_url(f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}")
    try:
        yield url
    finally:
        engine_for(url).dispose()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module", params=["postgres-redis-s3", "embedded"])
def service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            models_root: Path) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp(request.param)
    queue = f"prunekit-it-{secrets.token_hex(4)}"
    database = ExitStack()
    if request.param == "embedded":
        overrides = {"QUEUE_NAME": queue}  # SQLite, the SQLAlchemy broker on SQLite, a local artifact folder
    else:
        pg_url = database.enter_context(fresh_database())
        s3 = request.getfixturevalue("s3_endpoint")
        bucket = f"prunekit-it-{secrets.token_hex(4)}"
        boto3.client("s3", endpoint_url=s3, region_name="us-east-1").create_bucket(Bucket=bucket)
        overrides = {"DATABASE_URL": pg_url, "BROKER_URL": REDIS_URL, "QUEUE_NAME": queue,
                     "ARTIFACT_STORE": f"s3://{bucket}/artifacts", "S3_ENDPOINT_URL": s3}
    with database:
        svc = start_service(overrides, tmp, models_root)
        svc.env["STACK"] = request.param
        try:
            yield svc
        finally:
            stop_service(svc)
    if request.param != "embedded":
        import redis

        redis.Redis.from_url(REDIS_URL).delete(queue, f"{queue}-webhooks")


def run_job(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    """Submits a job and waits for it; it must succeed (the assertion message carries the service's logs)."""
    from tests.integration.test_job_flow import wait_until_ended

    submitted = service.http.post("/v1/jobs", json=body)
    assert submitted.status_code == 201, submitted.text
    job = wait_until_ended(service.http, submitted.json()["id"], service)
    assert job["status"] == "succeeded", f"{job['error']}{service.log_tail()}"
    return job


@contextmanager
def service_with_model(build: Callable[[Path], object], stem: str, tmp: Path,
                       models_root: Path) -> Iterator[tuple[Service, str]]:
    """The embedded stack with a model of its own, built by `build` into the shared models root, and its name."""
    name = f"{stem}-{secrets.token_hex(3)}"
    build(models_root / name)
    service = start_service({"QUEUE_NAME": f"prunekit-it-{secrets.token_hex(4)}"}, tmp, models_root)
    try:
        yield service, name
    finally:
        stop_service(service)
