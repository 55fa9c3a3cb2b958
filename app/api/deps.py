"""Dependencies declared once and reused by every router."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session, sessionmaker

from app.auth import KeyCache, Principal, authenticate, cached_principal
from app.errors import Problem
from app.ratelimit import Limiter
from prunekit.core.config import Settings


# Dependencies that do no I/O are async: FastAPI runs a sync one on the threadpool, and each such hop (a thread
# hand-off and back, contending for the GIL under load) cost about 1 ms a request in bench/load.py.
async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    # Making a Session does no I/O (it connects on first use), so it is made here on the event loop; ending an open
    # transaction does (COMMIT or ROLLBACK), so that goes to the threadpool, as the sync routes that use it run there.
    session: Session = request.app.state.sessions()
    try:
        yield session
        if session.in_transaction():
            await run_in_threadpool(_commit_and_close, session)
        else:  # never used, or the route ended its transaction itself: nothing left to send
            session.close()
    except BaseException:
        try:
            await run_in_threadpool(_rollback_and_close, session)
        finally:
            session.close()  # cancelled before the threadpool ran it: the connection still goes back to the pool
        raise


def _commit_and_close(session: Session) -> None:
    try:
        session.commit()
    finally:
        session.close()


def _rollback_and_close(session: Session) -> None:
    try:
        session.rollback()
    finally:
        session.close()


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]


async def get_principal(request: Request) -> Principal:
    # On the event loop: a key seen in the last API_KEY_CACHE_TTL_S seconds needs no query, and the limiter asks
    # Redis asynchronously, so most requests reach their route without a trip to the threadpool.
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise Problem(401, "missing_api_key", "Send your API key as 'Authorization: Bearer <key>'.",
                      headers={"WWW-Authenticate": "Bearer"})
    principal = None
    if scheme.lower() == "bearer":
        key, cache = token.strip(), request.app.state.key_cache
        principal = cached_principal(cache, key) or await run_in_threadpool(
            _authenticate, request.app.state.read_sessions, key, cache)
    if principal is None:
        raise Problem(401, "invalid_api_key", "The API key is not valid or has been revoked.",
                      headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    await enforce_rate_limits(request, principal.tenant_id)
    return principal


def _authenticate(sessions: sessionmaker[Session], key: str, cache: KeyCache) -> Principal | None:
    with sessions() as session:  # one statement: the read sessions' autocommit is enough
        return authenticate(session, key, cache)


async def enforce_rate_limits(request: Request, tenant_id: str) -> None:
    settings: Settings = request.app.state.settings
    limiter: Limiter = request.app.state.limiter
    buckets = [(f"{tenant_id}:all", settings.rate_limit_per_minute)]
    if request.method == "POST" and request.url.path.rstrip("/") == "/v1/jobs":
        buckets.append((f"{tenant_id}:create", settings.job_create_limit_per_minute))
    refusal = await limiter.hit(buckets)  # one round trip to Redis for all of them
    if refusal is not None:
        raise Problem(429, "rate_limited", f"Too many requests: at most {refusal.limit} a minute for this key's "
                      f"tenant here. Retry in {refusal.retry_after} s.",
                      headers={"Retry-After": str(refusal.retry_after)})


PrincipalDep = Annotated[Principal, Depends(get_principal)]
