"""API keys from the command line (the HTTP layer authenticates them)."""

from __future__ import annotations

from prunekit.core.config import Settings


def create_key(settings: Settings, tenant: str, name: str = "") -> str:
    from app.auth import create_key as _create
    from prunekit.core.db.session import migrate, session_scope

    migrate(settings.database_url)
    with session_scope(settings) as session:
        return _create(session, tenant, name)
