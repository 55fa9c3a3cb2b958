"""The job's life in the service core: status changes on a real (SQLite) database, the store's key layout, the
periodic thread, and the one job document that the API and the webhooks both send."""

from __future__ import annotations

import secrets
import threading
from collections import namedtuple
from pathlib import Path

import pytest

from app.schemas import job_out
from prunekit.core import layout, lifecycle
from prunekit.core.config import Settings
from prunekit.core.db import queries
from prunekit.core.db.models import Job, Tenant
from prunekit.core.db.session import migrate, session_scope
from prunekit.core.documents import job_document
from prunekit.core.periodic import Periodic
from prunekit.vocabulary import JobStatus


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    url = f"sqlite:///{tmp_path / 'life.db'}"
    migrate(url)
    return Settings(PRUNEKIT_VAR_DIR=tmp_path, database_url=url)


def new_job(settings: Settings, request: dict[str, object] | None = None) -> tuple[str, str]:
    with session_scope(settings) as session:
        tenant = Tenant(id=f"ten_{secrets.token_hex(6)}", name=f"life-{secrets.token_hex(4)}")
        session.add(tenant)
        session.flush()
        job, _ = queries.create_job(session, tenant.id, request or {"model": "local:x", "method": "wanda",
                                                                    "sparsity": 0.5}, {"team": "a"}, None)
    return tenant.id, job.id


def test_a_job_runs_publishes_and_succeeds(settings: Settings) -> None:
    tenant_id, job_id = new_job(settings, {"model": "local:x", "method": "wanda", "sparsity": 0.5,
                                           "webhook": {"url": "https://example.com/hook"}})
    with session_scope(settings) as session:
        claimed = lifecycle.claim(session, job_id, "w1", 60, 2)
    assert isinstance(claimed, lifecycle.Claimed) and (claimed.attempt, claimed.tenant_id) == (1, tenant_id)
    with session_scope(settings) as session:
        assert lifecycle.claim(session, job_id, "w2", 60, 2) == "skipped"
        lifecycle.record_progress(session, job_id, "pruning", 1, 4)
        assert not lifecycle.cancel_requested(session, job_id)
        key = layout.attempt_prefix(tenant_id, job_id, 1) + "/model.safetensors"
        lifecycle.publish(session, job_id, tenant_id, [lifecycle.StoredFile("model.safetensors", key, 3, "0" * 64,
                                                                            "application/octet-stream")])
        ended = lifecycle.finish(session, job_id, JobStatus.SUCCEEDED, "done", metrics={"sparsity": 0.5})
    assert ended == lifecycle.Ended(job_id, tenant_id, JobStatus.SUCCEEDED, webhook=True)
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.status, job.lease_owner, job.metrics) == ("succeeded", None, {"sparsity": 0.5})
        assert job.progress == {"stage": "done", "done": 1, "total": 4, "fraction": 1.0}
        assert [a.storage_key for a in queries.list_artifacts(session, job_id)] == [key]
        events, _ = queries.list_events(session, job_id, None, 100)
    assert [(e.message, (e.data or {}).get("status")) for e in events] == [
        ("Job queued.", "queued"), ("Job started on worker w1.", "running"), ("pruning: 1/4", None),
        ("Stored 1 artifacts.", None), ("done", "succeeded")]


def test_a_failed_job_keeps_no_artifact_rows_and_cancel_ends_only_a_queued_job(settings: Settings) -> None:
    tenant_id, job_id = new_job(settings)
    with session_scope(settings) as session:
        lifecycle.claim(session, job_id, "w1", 60, 2)
        lifecycle.publish(session, job_id, tenant_id, [lifecycle.StoredFile("a.json", "k", 1, "0" * 64, "x")])
        job = session.get(Job, job_id)
        assert job is not None
        assert lifecycle.cancel(session, job) is None and job.status == "cancel_requested"
        assert lifecycle.cancel_requested(session, job_id)
        ended = lifecycle.finish(session, job_id, JobStatus.FAILED, "boom", error={"code": "x", "message": "boom"})
        assert ended.status == JobStatus.FAILED and not ended.webhook
        assert queries.list_artifacts(session, job_id) == []
        with pytest.raises(queries.StateConflict):
            lifecycle.cancel(session, job)
    _, queued = new_job(settings)
    with session_scope(settings) as session:
        job = session.get(Job, queued)
        assert job is not None
        ended = lifecycle.cancel(session, job)
    assert ended is not None and ended.status == JobStatus.CANCELLED


def test_the_key_layout_keeps_everything_of_a_job_under_its_prefix() -> None:
    assert layout.attempt_prefix("t", "job_1", 2) == "t/job_1/attempt-2"
    assert layout.checkpoints_prefix("t", "job_1").startswith(layout.job_prefix("t", "job_1") + "/")
    assert layout.dataset_key("t", "ds_1", "text.jsonl") == "t/datasets/ds_1/text.jsonl"
    assert layout.score_cache_prefix("t") == "t/score-cache"
    keys = ["t/job_1/attempt-1/report.json", "t/job_1/attempt-2/sub/model.safetensors",
            "t/job_1/checkpoints/state.json", "t/job_1/attempt-3", "t/job_10/attempt-1/report.json"]
    assert layout.attempt_prefixes(keys, "t", "job_1") == {"t/job_1/attempt-1", "t/job_1/attempt-2"}


def test_periodic_calls_until_stopped_and_outlives_a_failing_call() -> None:
    calls: list[int] = []
    done = threading.Event()

    def tick() -> None:
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("a database blip")
        if len(calls) == 4:
            loop.stop()  # from inside its own thread
            done.set()

    loop = Periodic("test-periodic", 0.01, tick, at_start=True)
    loop.start()
    assert done.wait(5)
    loop.stop()
    assert calls == [0, 1, 2, 3]


def test_the_api_and_the_webhooks_describe_a_job_alike(settings: Settings) -> None:
    _, job_id = new_job(settings)
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        assert job is not None
        document = job_document(job)
        assert job_out(job).model_dump(mode="json") == document
        view = namedtuple("Row", ["id", "status", "request", "metadata_", "progress", "metrics", "error",
                                  "created_at", "started_at", "finished_at"])(
            job.id, job.status, job.request, job.metadata_, job.progress, job.metrics, job.error, job.created_at,
            job.started_at, job.finished_at)
    assert job_document(view) == document and list(document) == list(job_out(view).model_dump())
    assert document["object"] == "pruning.job" and document["metadata"] == {"team": "a"}
