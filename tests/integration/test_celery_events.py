"""Celery task events are usable by flower: a real API and worker on the Redis broker emit the task lifecycle
and worker heartbeats on the events exchange, where a celery.events.Receiver (what flower runs) sees them."""

from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path
from typing import Any

import redis

from prunekit.core.config import Settings
from prunekit.queue import RUN_JOB_TASK, make_celery
from tests.conftest import REDIS_URL
from tests.integration.conftest import fresh_database, start_service, stop_service
from tests.integration.test_job_flow import SMALL

LIFECYCLE = ("task-sent", "task-received", "task-started", "task-succeeded")


class EventLog:
    """Every event the receiver saw, in order, and a way to wait for one."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.changed = threading.Condition()

    def add(self, event: dict[str, Any]) -> None:
        with self.changed:
            self.events.append(event)
            self.changed.notify_all()

    def wait_for(self, matches: Any, timeout_s: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while True:
                found = next((e for e in self.events if matches(e)), None)
                left = deadline - time.monotonic()
                if found is not None or left <= 0:
                    return found
                self.changed.wait(left)


def test_task_and_worker_events_reach_a_receiver(tmp_path: Path, models_root: Path) -> None:
    started = time.monotonic()
    queue = f"prunekit-it-{secrets.token_hex(4)}"
    log = EventLog()
    with fresh_database() as database_url:
        overrides = {"DATABASE_URL": database_url, "BROKER_URL": REDIS_URL, "QUEUE_NAME": queue}
        service = start_service(overrides, tmp_path, models_root)
        # The same Celery configuration the API and worker use, as flower would be pointed at the same broker.
        celery = make_celery(Settings(database_url=database_url, broker_url=REDIS_URL, queue_name=queue))
        connection = celery.connection_for_read()
        # wakeup=False: asking every worker on this shared Redis for a heartbeat would disturb other runs.
        receiver = celery.events.Receiver(connection, handlers={"*": log.add})
        thread = threading.Thread(target=receiver.capture, kwargs={"limit": None, "timeout": None, "wakeup": False},
                                  daemon=True)
        thread.start()
        try:
            # Other services may share this Redis: only our worker's heartbeats count. A first one also proves the
            # receiver is subscribed (events are pub/sub: nothing sent before that is kept for it).
            worker = f"prunekit-{service.processes['worker'].pid}@"
            heartbeat = log.wait_for(lambda e: e.get("type") == "worker-heartbeat"
                                     and str(e.get("hostname", "")).startswith(worker), 15)
            assert heartbeat is not None, f"no worker-heartbeat from {worker} in 15 s{service.log_tail()}"

            with service.http as http:
                submitted = http.post("/v1/jobs", json={"model": "local:tiny-llama", "method": "magnitude",
                                                        "sparsity": 0.5, **SMALL})
                assert submitted.status_code == 201, submitted.text
                job_id = submitted.json()["id"]

                # task-sent and task-received name the task and carry its args; later events only its uuid.
                sent = log.wait_for(lambda e: e.get("type") == "task-sent" and e.get("name") == RUN_JOB_TASK
                                    and job_id in str(e.get("args")), 10)
                assert sent is not None, f"no task-sent for {job_id}: {types_seen(log)}{service.log_tail()}"
                uuid = sent["uuid"]
                budget = max(5.0, 55 - (time.monotonic() - started))
                done = log.wait_for(lambda e: e.get("uuid") == uuid and e.get("type") in ("task-succeeded",
                                                                                           "task-failed"), budget)
                job = http.get(f"/v1/jobs/{job_id}").json()
            assert done is not None and done["type"] == "task-succeeded", \
                f"task {uuid} did not succeed: {done}; job {job['status']} {job['error']}{service.log_tail()}"
            assert job["status"] == "succeeded", f"{job['error']}{service.log_tail()}"

            ours = [e for e in log.events if e.get("uuid") == uuid]
            types = [e["type"] for e in ours]
            for kind in LIFECYCLE:
                assert kind in types, f"no {kind} for {job_id}: {types}"
            # Flower's task view needs the order to follow the lifecycle.
            assert [types.index(kind) for kind in LIFECYCLE] == sorted(types.index(kind) for kind in LIFECYCLE)
            received = next(e for e in ours if e["type"] == "task-received")
            assert received["name"] == RUN_JOB_TASK and job_id in str(received["args"])
            assert str(received["hostname"]).startswith(worker)
            assert sent["queue"] == queue
            beats = [e for e in log.events if e.get("type") == "worker-heartbeat"
                     and str(e.get("hostname", "")).startswith(worker)]
            assert beats and all("active" in e and "freq" in e for e in beats)
        finally:
            receiver.should_stop = True
            thread.join(10)
            connection.release()
            stop_service(service)
            client = redis.Redis.from_url(REDIS_URL)
            client.delete(queue, *client.keys(f"{queue}*"), f"_kombu.binding.{queue}")
    assert time.monotonic() - started < 60


def types_seen(log: EventLog) -> list[str]:
    return sorted({str(e.get("type")) for e in log.events})

