"""Engine and sessions; the schema is created only by alembic."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from prunekit.core.config import Settings, get_settings

MIGRATIONS_DIR = Path(__file__).resolve().parents[3] / "migrations"


def make_engine(database_url: str) -> Engine:
    if database_url.startswith("sqlite"):
        path = database_url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(database_url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            # WAL lets the API read while the worker writes; foreign keys are off by default in SQLite.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(database_url, pool_pre_ping=True, pool_size=10, max_overflow=20)


@lru_cache
def engine_for(database_url: str) -> Engine:
    return make_engine(database_url)


def read_engine_for(database_url: str) -> Engine:
    """The engine's connections in autocommit mode, for reads of one statement: one round trip (no BEGIN and COMMIT
    around the query). On Postgres the polled route reads through prunekit/core/db/async_reads.py instead."""
    return engine_for(database_url).execution_options(isolation_level="AUTOCOMMIT")


def session_factory(settings: Settings | None = None) -> sessionmaker[Session]:
    settings = settings or get_settings()
    return sessionmaker(engine_for(settings.database_url), expire_on_commit=False)


def read_session_factory(settings: Settings | None = None) -> sessionmaker[Session]:
    """Sessions for reads of one statement, in autocommit mode: the read is one round trip to the database instead
    of three (BEGIN, the query, COMMIT). Not for several statements that must see one snapshot, nor for writes."""
    settings = settings or get_settings()
    return sessionmaker(read_engine_for(settings.database_url), expire_on_commit=False)


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    with transaction(session_factory(settings)()) as session:
        yield session


@contextmanager
def transaction(session: Session) -> Iterator[Session]:
    """What the block wrote, committed; rolled back if it raised; the session closed either way."""
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def migrate(database_url: str) -> None:
    """Bring the schema to the newest alembic revision (run at every start-up; a no-op when current)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    command.upgrade(cfg, "head")
