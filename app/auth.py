"""API keys: created once, shown once, stored only as a SHA-256 digest; each belongs to a tenant."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from prunekit.core.db.models import ApiKey, Tenant
from prunekit.core.ids import new_id

KEY_PREFIX = "pk_"


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    key_id: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyCache:
    """Keys that authenticated in the last `ttl_s` seconds, by digest (never the key itself), so that most requests
    skip the key query. A revocation made elsewhere (`prunekit keys revoke`, another API process) takes effect here
    within `ttl_s`; one made in this process (`revoke_key`) drops the key from every cache at once. Only successful
    lookups are kept: an unknown or revoked key is looked up every time, so a new key works at once. Bounded: when
    full, the oldest entry makes room."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()
        _caches.add(self)

    def get(self, digest: str) -> Principal | None:
        # Looked up by the key's SHA-256, as in the database: timing tells nothing about the key itself.
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if entry[0] <= time.monotonic():
                del self._entries[digest]
                return None
            return entry[1]

    def put(self, digest: str, principal: Principal) -> None:
        if self.ttl_s <= 0:
            return
        now = time.monotonic()
        with self._lock:
            self._entries.pop(digest, None)  # re-inserted last: the oldest entry is always the first
            if len(self._entries) >= self.max_entries:
                for stale in [d for d, (expires, _) in self._entries.items() if expires <= now]:
                    del self._entries[stale]
                while len(self._entries) >= self.max_entries:
                    del self._entries[next(iter(self._entries))]
            self._entries[digest] = (now + self.ttl_s, principal)

    def drop(self, digests: Iterable[str]) -> None:
        with self._lock:
            for digest in digests:
                self._entries.pop(digest, None)

    def __len__(self) -> int:
        return len(self._entries)


# Every KeyCache of this process (one per app), so that revoke_key reaches them all.
_caches: weakref.WeakSet[KeyCache] = weakref.WeakSet()


def forget_keys(digests: Iterable[str]) -> None:
    """Drops keys from every key cache in this process."""
    digests = list(digests)
    for cache in list(_caches):
        cache.drop(digests)


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
    from prunekit.core.db.models import utcnow

    query = select(ApiKey).where(ApiKey.revoked_at.is_(None))
    if len(key_or_prefix) > 16:
        query = query.where(ApiKey.key_hash == hash_key(key_or_prefix))
    else:
        query = query.where(ApiKey.prefix == key_or_prefix)
    rows = list(session.scalars(query))
    for row in rows:
        row.revoked_at = utcnow()
    session.flush()
    digests = [row.key_hash for row in rows]
    # Dropped now and again once the revocation commits: a request that looked the key up in between (and still
    # saw it valid) cannot keep it cached.
    forget_keys(digests)
    if digests:
        event.listen(session, "after_commit", lambda _: forget_keys(digests), once=True)
    return len(rows)


def cached_principal(cache: KeyCache, key: str) -> Principal | None:
    """The key's principal if it authenticated within the cache's TTL; None means: ask the database."""
    return cache.get(hash_key(key)) if key.startswith(KEY_PREFIX) else None


def authenticate(session: Session, key: str, cache: KeyCache | None = None) -> Principal | None:
    if not key.startswith(KEY_PREFIX):
        return None
    digest = hash_key(key)
    if cache is not None and (principal := cache.get(digest)) is not None:
        return principal
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None)))
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        return None
    principal = Principal(tenant_id=row.tenant_id, key_id=row.id)
    if cache is not None:
        cache.put(digest, principal)
    return principal
