"""Webhooks have a queue and a consumer of their own: a job's webhook goes out within seconds while the only job
worker is busy with a long job (on one shared queue it waited until that job ended), on both stacks."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.conftest import Service
from tests.integration.test_job_flow import Receiver
from tests.integration.test_reliability import (  # noqa: F401 (fixtures used by name)
    SLOW,
    ended,
    make_service,
    submit,
    tiny_llama_8,
    wait_for_status,
)

# Long enough (tens of seconds on a CPU) that it is still running when the other job's webhook is due.
LONG = SLOW | {"calibration": {"num_samples": 256, "seq_len": 256}, "evaluation": {"num_samples": 64, "seq_len": 256}}
# "A few seconds": the consumer polls an SQLite broker once a second; Redis hands a message over at once.
WITHIN_S = 10.0


def deliveries(receiver: Receiver, job_id: str) -> list[dict[str, Any]]:
    payloads = [json.loads(body) for _, body in list(receiver.requests)]
    return [p for p in payloads if p["data"]["id"] == job_id]


def wait_for_delivery(receiver: Receiver, job_id: str, timeout_s: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := deliveries(receiver, job_id):
            return found[0]
        time.sleep(0.1)
    return None


@pytest.mark.parametrize("stack", ["postgres-redis-s3", "embedded"])
def test_a_webhook_is_sent_while_the_only_job_worker_runs_a_long_job(make_service: Callable[..., Service],  # noqa: F811
                                                                      tiny_llama_8: str, stack: str) -> None:  # noqa: F811
    service = make_service(stack)
    receiver = Receiver(failures=0)
    try:
        webhook = {"webhook": {"url": receiver.url}}
        long_job = submit(service, LONG | {"model": tiny_llama_8} | webhook)
        wait_for_status(service, [long_job], lambda j: j["status"] == "running" and j["progress"] is not None,
                        120, "the long job running")
        # The only job worker is busy: this job stays queued, and cancelling it ends it at once, in the API.
        waiting = submit(service, SLOW | webhook)
        cancelled = service.http.post(f"/v1/jobs/{waiting}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
        asked = time.monotonic()

        delivered = wait_for_delivery(receiver, waiting, WITHIN_S)
        took = time.monotonic() - asked
        long_status = service.http.get(f"/v1/jobs/{long_job}").json()["status"]
        assert delivered is not None, \
            f"no webhook for {waiting} within {WITHIN_S} s (long job {long_status}){service.log_tail()}"
        assert delivered["type"] == "pruning.job.cancelled"
        # Sent beside the running job, not after it: on a shared queue it waits until the long job ends.
        assert long_status == "running", f"the long job ended ({long_status}) before the test could tell"
        print(f"[{stack}] webhook delivered {took:.1f} s after the cancel, the long job still running")

        # The job worker's own webhooks take the same queue: the long job's end, once it winds down.
        assert service.http.post(f"/v1/jobs/{long_job}/cancel").status_code == 200
        wait_for_status(service, [long_job], ended, 120, "the long job cancelled")
        last = wait_for_delivery(receiver, long_job, 30)
        assert last is not None and last["type"] == "pruning.job.cancelled", f"{last}{service.log_tail()}"
    finally:
        receiver.server.shutdown()
