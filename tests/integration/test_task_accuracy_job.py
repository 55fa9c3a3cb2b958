"""Task accuracy through the real service (embedded stack: HTTP, a Celery worker, the store): a job
scores the built-in task and an uploaded task file, dense and pruned; bad task files and misplaced datasets are
refused with 422s naming the field."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Service, run_job, start_service, stop_service
from tests.integration.test_job_flow import download_artifacts

SMALL = {"calibration": {"num_samples": 2, "seq_len": 32}}
JOB = {"model": "local:tiny-llama", "method": "wanda", "sparsity": 0.5, **SMALL}
ITEMS = [{"context": "The capital of France is", "choices": ["Paris.", "a banana.", "blue"], "answer": 0},
         {"context": "Water freezes at zero degrees", "choices": ["Celsius.", "Fahrenheit."], "answer": 0},
         {"context": "One, two,", "choices": ["three", "four", "five", "six"], "answer": 0}]


def _jsonl(*records: object) -> bytes:
    return "\n".join(json.dumps(record) for record in records).encode()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[Service]:
    running = start_service({"QUEUE_NAME": f"prunekit-it-{secrets.token_hex(4)}"},
                            tmp_path_factory.mktemp("tasks"), models_root)
    try:
        yield running
    finally:
        stop_service(running)


def _upload(service: Service, name: str, content: bytes) -> dict[str, object]:
    answer = service.http.post("/v1/datasets", files={"file": (name, content, "application/jsonl")})
    assert answer.status_code == 201, answer.text
    return answer.json()


def test_a_job_scores_the_builtin_task_and_an_uploaded_one_dense_and_pruned(service: Service, tmp_path: Path) -> None:
    assert "builtin:wiki-next-sentence" in service.http.get("/v1/capabilities").json()["tasks"]
    uploaded = _upload(service, "mine.jsonl", _jsonl(*ITEMS))
    assert uploaded["kind"] == "task" and uploaded["num_records"] == len(ITEMS)
    ds = uploaded["id"]
    job = run_job(service, {**JOB, "evaluation": {"num_samples": 2, "seq_len": 32, "task_num_samples": 12,
                                                  "tasks": ["builtin:wiki-next-sentence", ds]}})
    assert job["request"]["evaluation"]["tasks"] == ["builtin:wiki-next-sentence", ds]
    tasks = job["metrics"]["tasks"]
    assert set(tasks) == {"builtin:wiki-next-sentence", ds}  # the upload by its id, not the worker's file
    assert tasks["builtin:wiki-next-sentence"]["n"] == 12 and tasks[ds]["n"] == len(ITEMS)
    for entry in tasks.values():
        for which in ("dense", "pruned"):
            assert 0.0 <= entry[which]["acc"] <= 1.0 and 0.0 <= entry[which]["acc_norm"] <= 1.0
    assert "perplexity" in job["metrics"]  # measured beside the tasks
    download_artifacts(service.http, job["id"], tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tasks"] == tasks
    assert report["data"]["tasks"]["builtin:wiki-next-sentence"]["held_out_share_of_wiki_en"] == [0.25, 0.45]
    assert report["data"]["tasks"][ds]["file"] == ds
    # A dataset a job scores cannot be deleted while the job runs; after it, it can.
    assert service.http.delete(f"/v1/datasets/{ds}").status_code == 204


def test_bad_task_files_and_misplaced_datasets_are_refused_naming_the_field(service: Service) -> None:
    bad = service.http.post("/v1/datasets", files={"file": ("bad.jsonl", _jsonl(
        ITEMS[0], {"context": "c", "choices": ["a", "b"], "answer": 5}), "application/jsonl")})
    assert bad.status_code == 422, bad.text
    problem = bad.json()
    assert problem["code"] == "invalid_upload" and problem["param"] == "file"
    assert "line 2: field 'answer' must be the index of the right choice" in problem["detail"]

    text = _upload(service, "text.jsonl", _jsonl({"text": "plain text"}))["id"]
    task = _upload(service, "task.jsonl", _jsonl(*ITEMS))["id"]
    for body, param, code in (
        ({**JOB, "evaluation": {"tasks": [text]}}, "evaluation.tasks", "incompatible_dataset"),
        ({**JOB, "evaluation": {"tasks": ["ds_" + "0" * 26]}}, "evaluation.tasks", "dataset_not_found"),
        ({**JOB, "evaluation": {"tasks": ["builtin:nope"]}}, "evaluation.tasks", "invalid_request"),
        ({**JOB, "evaluation": {"tasks": [task, task]}}, "evaluation.tasks", "invalid_request"),
        ({**JOB, "calibration": {**SMALL["calibration"], "dataset": task}}, "calibration.dataset",
         "incompatible_dataset"),
    ):
        answer = service.http.post("/v1/jobs", json=body)
        assert answer.status_code == 422, answer.text
        assert (answer.json()["param"], answer.json()["code"]) == (param, code), answer.text
