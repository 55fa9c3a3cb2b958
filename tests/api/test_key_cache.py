"""The in-process cache of authenticated keys: most requests skip the key query, yet a revocation still takes
effect, at once when made in this process and within API_KEY_CACHE_TTL_S when made elsewhere."""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
from fastapi.testclient import TestClient

from app.auth import KeyCache, Principal, hash_key, revoke_key
from app.main import create_app
from prunekit.core.config import Settings
from prunekit.core.db.session import session_scope


def revoke_elsewhere(settings: Settings, key: str) -> None:
    """What `prunekit keys revoke` on another host does to this API process: a row changes, nothing else."""
    plain_url = settings.database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain_url, autocommit=True) as conn:
        conn.execute("UPDATE api_keys SET revoked_at = now() WHERE key_hash = %s", (hash_key(key),))


def test_a_key_revoked_in_this_process_is_refused_at_once_even_while_cached(
        settings: Settings, new_key: Callable[[str], str]) -> None:
    key = new_key("tenant-cached")
    headers = {"Authorization": f"Bearer {key}"}
    app = create_app(settings.model_copy(update={"api_key_cache_ttl_s": 300}))
    with TestClient(app) as client:
        assert client.get("/v1/jobs", headers=headers).status_code == 200
        assert app.state.key_cache.get(hash_key(key)) is not None  # cached for five minutes
        with session_scope(settings) as session:
            assert revoke_key(session, key[:10]) == 1
        assert app.state.key_cache.get(hash_key(key)) is None
        response = client.get("/v1/jobs", headers=headers)
        assert response.status_code == 401 and response.json()["code"] == "invalid_api_key"


def test_a_key_revoked_elsewhere_is_refused_once_the_cache_ttl_has_passed(
        settings: Settings, new_key: Callable[[str], str]) -> None:
    key = new_key("tenant-elsewhere")
    headers = {"Authorization": f"Bearer {key}"}
    ttl_s = 1.5
    with TestClient(create_app(settings.model_copy(update={"api_key_cache_ttl_s": ttl_s}))) as client:
        assert client.get("/v1/jobs", headers=headers).status_code == 200
        cached_at = time.monotonic()
        revoke_elsewhere(settings, key)
        if time.monotonic() - cached_at < ttl_s / 2:  # this process cannot know yet: the TTL bounds the delay
            assert client.get("/v1/jobs", headers=headers).status_code == 200
        time.sleep(max(0.0, cached_at + ttl_s + 0.1 - time.monotonic()))
        assert client.get("/v1/jobs", headers=headers).status_code == 401
    # Without the cache, every request asks the database.
    key = new_key("tenant-uncached")
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings.model_copy(update={"api_key_cache_ttl_s": 0}))) as client:
        assert client.get("/v1/jobs", headers=headers).status_code == 200
        revoke_elsewhere(settings, key)
        assert client.get("/v1/jobs", headers=headers).status_code == 401


def test_the_cache_is_bounded_and_forgets_expired_keys() -> None:
    cache = KeyCache(ttl_s=60, max_entries=3)
    for i in range(4):
        cache.put(f"digest-{i}", Principal(tenant_id=f"ten_{i}", key_id=f"key_{i}"))
    assert len(cache) == 3 and cache.get("digest-0") is None and cache.get("digest-3") is not None
    short = KeyCache(ttl_s=0.05)
    short.put("digest", Principal(tenant_id="ten", key_id="key"))
    assert short.get("digest") is not None
    time.sleep(0.1)
    assert short.get("digest") is None
    off = KeyCache(ttl_s=0)
    off.put("digest", Principal(tenant_id="ten", key_id="key"))
    assert off.get("digest") is None
