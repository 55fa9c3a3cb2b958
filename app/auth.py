"""API keys: created once, shown once, stored only as a SHA-256 digest; each belongs to a tenant."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import ApiKey, Tenant
from app.ids import new_id

KEY_PREFIX = "pk_"


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    key_id: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(id=new_id("ten"), name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, tenant_name: str, key_name: str = "") -> str:
    """Returns the plaintext key; it cannot be recovered later."""
    tenant = get_or_create_tenant(session, tenant_name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(id=new_id("key"), tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:10],
                       name=key_name))
    session.flush()
    return key


def revoke_key(session: Session, key_or_prefix: str) -> int:
    """Revokes by the key itself or by the prefix shown at creation; returns how many keys were revoked."""
    from app.db.models import utcnow

    query = select(ApiKey).where(ApiKey.revoked_at.is_(None))
    if len(key_or_prefix) > 16:
        query = query.where(ApiKey.key_hash == hash_key(key_or_prefix))
    else:
        query = query.where(ApiKey.prefix == key_or_prefix)
    rows = list(session.scalars(query))
    for row in rows:
        row.revoked_at = utcnow()
    session.flush()
    return len(rows)


def authenticate(session: Session, key: str) -> Principal | None:
    if not key.startswith(KEY_PREFIX):
        return None
    digest = hash_key(key)
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None)))
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        return None
    return Principal(tenant_id=row.tenant_id, key_id=row.id)
