"""Service routes: capabilities, liveness, readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.api.deps import PrincipalDep, SettingsDep
from app.capabilities import capabilities
from prunekit.queue import broker_reachable

router = APIRouter(tags=["service"])


@router.get("/v1/capabilities")
def get_capabilities(_: PrincipalDep, settings: SettingsDep) -> dict[str, Any]:
    return capabilities(settings)


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "the database or the broker is unreachable", "content": {
    "application/json": {"schema": {"type": "object", "properties": {"status": {"const": "not_ready"},
                                                                     "checks": {"type": "object"}}}}}}})
def readyz(request: Request) -> JSONResponse:
    checks = {"database": _database_ok(request), "broker": broker_reachable(request.app.state.settings)}
    ready = all(checks.values())
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks},
                        status_code=200 if ready else 503)


def _database_ok(request: Request) -> bool:
    try:
        with request.app.state.sessions() as session:
            session.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
