from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.auth import create_key
from app.main import create_app
from prunekit.core.config import Settings
from prunekit.core.db.session import session_scope
from tests.conftest import REDIS_URL


@pytest.fixture
def settings(pg_url: str, queue_name: str, tmp_path: Path) -> Settings:
    models = tmp_path / "models"
    (models / "tiny-llama").mkdir(parents=True)  # the API only checks that a local model exists
    return Settings(PRUNEKIT_VAR_DIR=tmp_path, database_url=pg_url, broker_url=REDIS_URL, queue_name=queue_name,
                    models_root=models)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def new_key(settings: Settings, client: TestClient) -> Callable[[str], str]:
    def make(tenant: str) -> str:
        # Tenants are unique per test: the database is shared by the whole run.
        with session_scope(settings) as session:
            return create_key(session, f"{tenant}-{secrets.token_hex(4)}")

    return make


@pytest.fixture
def auth(new_key: Callable[[str], str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {new_key('tenant-a')}"}
