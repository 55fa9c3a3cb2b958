"""Reads for the route clients poll (GET /v1/jobs/{id}), on Postgres, made on the event loop.

Each API process keeps a few of psycopg's asyncio connections (autocommit: one round trip a read) and reads on
them without leaving the event loop. A read handed to a thread (SQLAlchemy is synchronous) cost about twice the
API's CPU: the hand-off each way, and the threads and the event loop contending for the GIL under load. The
statement is the one in prunekit/core/db/queries.py, compiled once for Postgres, so the query is still defined there.
SQLite (the embedded default) reads through SQLAlchemy on a few threads of its own (ThreadedReads); job_reads
picks one for the database.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import psycopg
from sqlalchemy import Select
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url

from prunekit.core.db import queries
from prunekit.core.db.session import read_engine_for

POOL_SIZE = 8  # reads at once per API process: more would only queue for the CPU
CONNECT_TIMEOUT_S = 5
STATEMENT_TIMEOUT_MS = 10_000


class DatabaseUnavailable(Exception):
    """The database could not be reached, or dropped the connection twice in a row."""


def _compiled(statement: Select[Any]) -> tuple[str, type]:
    sql = str(statement.compile(dialect=postgresql.dialect(paramstyle="pyformat")))  # type: ignore[no-untyped-call]
    return sql, namedtuple("Row", list(statement.selected_columns.keys()))  # type: ignore[misc]


_JOB_VIEW_SQL, _JobView = _compiled(queries.job_view_statement())


class JobReads(Protocol):
    async def job_view(self, tenant_id: str, job_id: str) -> Any | None:
        """The fields job_out reads, by attribute; None for a missing job or another tenant's."""
        ...

    async def close(self) -> None: ...


def job_reads(database_url: str) -> JobReads:
    return AsyncReads(database_url) if database_url.startswith("postgresql") else ThreadedReads(database_url)


class ThreadedReads:
    """SQLAlchemy's reads (SQLite) on POOL_SIZE threads of their own, not the shared threadpool."""

    def __init__(self, database_url: str, size: int = POOL_SIZE) -> None:
        self.engine = read_engine_for(database_url)
        self.threads = ThreadPoolExecutor(size, thread_name_prefix="prunekit-read")

    async def job_view(self, tenant_id: str, job_id: str) -> Any | None:
        return await asyncio.get_running_loop().run_in_executor(self.threads, self._job_view, tenant_id, job_id)

    def _job_view(self, tenant_id: str, job_id: str) -> Any | None:
        with self.engine.connect() as connection:
            return queries.read_job_view(connection, tenant_id, job_id)

    async def close(self) -> None:
        self.threads.shutdown(wait=False)


class AsyncReads:
    """A pool of connections for one event loop (a process normally runs one; tests run one per TestClient)."""

    def __init__(self, database_url: str, size: int = POOL_SIZE) -> None:
        url = make_url(database_url).set(drivername="postgresql")
        self.conninfo = url.render_as_string(hide_password=False)
        self.size = size
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()
        self._open = 0

    async def job_view(self, tenant_id: str, job_id: str) -> Any | None:
        row = await self._fetch_one(_JOB_VIEW_SQL, {"tenant_id": tenant_id, "job_id": job_id})
        return None if row is None else _JobView(*row)

    async def _fetch_one(self, sql: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
        # A connection the database dropped (a restart) is found on use: the read runs once more on a new one.
        for attempt in (1, 2):
            connection = await self._acquire()
            try:
                cursor = await connection.execute(sql, params)
                row = await cursor.fetchone()
            except psycopg.OperationalError as exc:
                await self._discard(connection)
                if attempt == 2 or not connection.broken:
                    raise DatabaseUnavailable(str(exc)) from exc
                continue
            except BaseException:
                await self._discard(connection)  # cancelled mid-read: its state is unknown
                raise
            self._idle.put_nowait(connection)
            return row
        raise AssertionError("unreachable")

    async def _acquire(self) -> psycopg.AsyncConnection[Any]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # connections belong to the loop that opened them
            self._loop, self._idle, self._open = loop, asyncio.Queue(), 0
        if self._idle.empty() and self._open < self.size:
            self._open += 1
            try:
                return await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                    options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}")
            except BaseException as exc:
                self._open -= 1
                if isinstance(exc, psycopg.OperationalError):
                    raise DatabaseUnavailable(str(exc)) from exc
                raise
        return await self._idle.get()

    async def _discard(self, connection: psycopg.AsyncConnection[Any]) -> None:
        self._open -= 1
        with contextlib.suppress(Exception):  # already broken: closing it is all that is left to do
            await connection.close()

    async def close(self) -> None:
        while not self._idle.empty():
            await self._discard(self._idle.get_nowait())
