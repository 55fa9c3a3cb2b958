"""Alembic environment: the URL comes from the caller, or else from Settings."""

from __future__ import annotations

from alembic import context

from prunekit.core.config import get_settings
from prunekit.core.db.models import Base
from prunekit.core.db.session import make_engine

config = context.config
url = config.get_main_option("sqlalchemy.url") or get_settings().database_url


def run_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = make_engine(url)
    with engine.connect() as connection:
        # Batch mode lets later ALTERs work on SQLite, which cannot alter columns in place.
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
