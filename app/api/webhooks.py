"""The tenant's webhook signing secret (Standard Webhooks, `whsec_...`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import PrincipalDep, SessionDep
from app.db import queries

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


@router.get("/secret")
def get_secret(session: SessionDep, principal: PrincipalDep) -> dict[str, Any]:
    return {"object": "webhook_secret", "secret": queries.webhook_secret(session, principal.tenant_id)}


@router.post("/secret/rotate")
def rotate_secret(session: SessionDep, principal: PrincipalDep) -> dict[str, Any]:
    return {"object": "webhook_secret", "secret": queries.webhook_secret(session, principal.tenant_id, rotate=True)}
