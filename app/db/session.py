"""Engine and sessions; the schema is created only by alembic."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings, get_settings

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
# Connections of an API process's read pool: more reads at once than this only queue for the CPU.
READ_POOL_SIZE = 8


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


@lru_cache
def read_engine_for(database_url: str) -> Engine:
    """An engine for reads of one statement, in autocommit mode (one round trip: no BEGIN and COMMIT around the
    query), for the routes clients poll. Its pool does not ping a connection before lending it, a second round trip
    on every request; read_with_retry answers a connection the database dropped meanwhile instead. No overflow
    either: a connection opened for a burst and closed after it costs more than the query (connect, authenticate),
    so a read waits for one of READ_POOL_SIZE instead."""
    if database_url.startswith("sqlite"):  # one file, one engine: its pragmas and its pool are shared
        return engine_for(database_url).execution_options(isolation_level="AUTOCOMMIT")
    return create_engine(database_url, pool_size=READ_POOL_SIZE, max_overflow=0, isolation_level="AUTOCOMMIT")


T = TypeVar("T")


def read_with_retry(engine: Engine, read: Callable[[Connection], T]) -> T:
    """Runs an idempotent read, once more on a new connection if the pooled one was dead (the database restarted
    since it was opened). The failure also marks every older connection of the pool stale, so a restart costs each
    API process one failed attempt, not one per pooled connection."""
    try:
        with engine.connect() as connection:
            return read(connection)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
    with engine.connect() as connection:
        return read(connection)


def session_factory(settings: Settings | None = None) -> sessionmaker[Session]:
    settings = settings or get_settings()
    return sessionmaker(engine_for(settings.database_url), expire_on_commit=False)


def read_session_factory(settings: Settings | None = None) -> sessionmaker[Session]:
    """Sessions for reads of one statement, in autocommit mode: the read is one round trip to the database instead
    of three (BEGIN, the query, COMMIT). Not for several statements that must see one snapshot, nor for writes."""
    settings = settings or get_settings()
    engine = engine_for(settings.database_url).execution_options(isolation_level="AUTOCOMMIT")
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    session = session_factory(settings)()
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
