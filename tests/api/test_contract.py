"""Contract test: schemathesis generates requests from /openapi.json and checks the real app's answers.

Bounded (a few examples per operation) so it stays a test, not a fuzzing campaign. Runs against real
Postgres and Redis like the other API tests, with a valid key so that generated requests get past auth.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from app.main import create_app
from prunekit.core.config import Settings
from tests.conftest import free_port, wait_for

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]



def _published_document() -> dict[str, Any]:
    # The document does not depend on the database: an app that never connects is enough to read it.
    with tempfile.TemporaryDirectory() as var:
        return create_app(Settings(PRUNEKIT_VAR_DIR=Path(var)), run_migrations=False).openapi()


schema = schemathesis.openapi.from_dict(_published_document())


@pytest.fixture
def live_url(settings: Settings) -> Iterator[str]:
    """The app behind a real uvicorn server on loopback, so requests go over real HTTP."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(f"{url}/healthz", timeout=1).status_code == 200, 30, "uvicorn")
    yield url
    server.should_exit = True
    thread.join(10)


@schema.parametrize()
@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_within_its_contract(case: schemathesis.Case, live_url: str,
                                                     auth: dict[str, str]) -> None:
    # Real Postgres and Redis behind the app; the live event stream follows a job until it ends, but a
    # generated id answers 404 at once.
    case.call_and_validate(base_url=live_url, headers=auth, checks=CHECKS, timeout=30)


def test_errors_are_documented_as_problem_json(settings: Settings) -> None:
    document = create_app(settings).openapi()
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            default = operation["responses"]["default"]["content"]
            assert list(default) == ["application/problem+json"], (method, path)
