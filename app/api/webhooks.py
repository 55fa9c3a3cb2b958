"""The tenant's webhook signing secret (Standard Webhooks, `whsec_...`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import PrincipalDep, SessionDep
from prunekit.core.webhooks import tenant_secret

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


@router.get("/secret")
def get_secret(session: SessionDep, principal: PrincipalDep) -> dict[str, Any]:
    secret = tenant_secret(session, principal.tenant_id)
    session.commit()  # a secret made on first use must be stored before a client relies on it
    return {"object": "webhook_secret", "secret": secret}


@router.post("/secret/rotate")
def rotate_secret(session: SessionDep, principal: PrincipalDep) -> dict[str, Any]:
    secret = tenant_secret(session, principal.tenant_id, rotate=True)
    session.commit()
    return {"object": "webhook_secret", "secret": secret}
