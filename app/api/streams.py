"""Server-Sent Events: a job's events live, from the first (or after Last-Event-ID) to the job's end."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import PrincipalDep, SessionDep
from app.api.jobs import EVENT_ID_MAX, JobId, load_job
from app.schemas import event_out
from prunekit.core.db import queries
from prunekit.core.db.models import Job
from prunekit.vocabulary import ENDED

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

POLL_S = 0.5
HEARTBEAT_S = 15.0


@router.get("/{job_id}/events/stream", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
def stream_events(job_id: JobId, request: Request, session: SessionDep, principal: PrincipalDep,
                  after: Annotated[int | None, Query(ge=0, le=EVENT_ID_MAX)] = None,
                  last_event_id: Annotated[str | None, Header()] = None) -> StreamingResponse:
    load_job(session, principal.tenant_id, job_id)
    cursor = after or 0
    resume = (last_event_id or "").strip()
    # ASCII digits only ("²".isdigit() is true, and int() refuses it), and no further than an event id can be: any
    # other value is not an id this stream sent, and is ignored as before.
    if resume.isascii() and resume.isdigit() and int(resume) <= EVENT_ID_MAX:
        cursor = max(cursor, int(resume))
    return StreamingResponse(_frames(request, job_id, cursor), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _poll(request: Request, job_id: str, cursor: int) -> tuple[list[str], int, bool]:
    with request.app.state.sessions() as session:
        # Status first, then events: an ended job's last events are never missed.
        job = session.get(Job, job_id)
        ended = job is None or job.status in ENDED
        events, _ = queries.list_events(session, job_id, cursor, 500)
    frames = []
    for event in events:
        payload = event_out(event).model_dump_json()
        frames.append(f"id: {event.id}\nevent: {event.type}\ndata: {payload}\n\n")
        cursor = event.id
    return frames, cursor, ended and not events


async def _frames(request: Request, job_id: str, cursor: int) -> AsyncIterator[str]:
    yield "retry: 2000\n\n"
    last_sent = time.monotonic()
    while not await request.is_disconnected():
        frames, cursor, done = await run_in_threadpool(_poll, request, job_id, cursor)
        for frame in frames:
            yield frame
        if frames:
            last_sent = time.monotonic()
        if done:
            yield f"event: end\ndata: {json.dumps({'job_id': job_id})}\n\n"
            return
        if time.monotonic() - last_sent > HEARTBEAT_S:
            yield ": keep-alive\n\n"  # proxies close idle connections
            last_sent = time.monotonic()
        await asyncio.sleep(POLL_S)
