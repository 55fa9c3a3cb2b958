"""Real parts for the tests: a fresh Postgres database, Redis, an S3 endpoint (moto server), processes."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("PRUNEKIT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("PRUNEKIT_TEST_REDIS", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sqlalchemy_url(plain: str) -> str:
    return plain.replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A database of its own for this test run, dropped at the end."""
    name = f"prunekit_test_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield sqlalchemy_url(f"{base}/{name}")
    from prunekit.core.db.session import engine_for

    engine_for.cache_clear()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def queue_name() -> Iterator[str]:
    """A Redis queue that only this test uses, deleted afterwards."""
    name = f"prunekit-test-{secrets.token_hex(4)}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(name, *client.keys(f"{name}*"))


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto in server mode: a real S3 HTTP endpoint on loopback."""
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(url, timeout=1).status_code < 500, 30, "moto server")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session", autouse=True)
def aws_test_credentials() -> None:
    # moto accepts any credentials; boto3 refuses to sign without some.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models root with the tiny Llama built from its config, as `prunekit models import tiny-llama` does."""
    from prunekit.fixtures.demo_models import build_tiny_llama

    root = tmp_path_factory.mktemp("models")
    build_tiny_llama(root / "tiny-llama")
    return root


@pytest.fixture(scope="session")
def digits_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real digits-clip recipe (about two minutes of one CPU thread), built once per run for unit and
    integration tests alike. PRUNEKIT_TEST_DIGITS_CLIP names a folder to keep it in between runs instead:
    the build's fingerprint (recipe, torch and transformers versions) decides whether it is reused."""
    from prunekit.fixtures.digits_clip import build_digits_clip

    kept = os.environ.get("PRUNEKIT_TEST_DIGITS_CLIP")
    dest = Path(kept) if kept else tmp_path_factory.mktemp("digits-clip") / "digits-clip"
    build_digits_clip(dest)
    return dest


def wait_for(check, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.3)
    raise TimeoutError(f"{what} not ready after {timeout_s} s (last error: {last})")
