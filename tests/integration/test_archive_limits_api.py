"""An image-text dataset the API stores, every job can use: through the real service (embedded stack).

Before the worker read uploads with the API's settings, an archive above the engine's own 20,000-member default
(but within the API's 100,000) was stored with a 201 and failed every job that used it (dataset_error).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from prunekit.fixtures.demo_models import build_tiny_clip
from tests.integration.conftest import Service, service_with_model
from tests.integration.test_job_flow import wait_until_ended
from tests.unit.test_archive_limits import OLD_ENGINE_MAX_MEMBERS, many_images_zip


@pytest.fixture(scope="module")
def clip_service(tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[tuple[Service, str]]:
    """The embedded stack with a tiny CLIP of its own in the shared models root."""
    tmp = tmp_path_factory.mktemp("archive-limits")
    with service_with_model(build_tiny_clip, "tiny-clip", tmp, models_root) as running:
        yield running


def test_an_archive_above_the_engines_old_member_limit_calibrates_a_job(clip_service: tuple[Service, str],
                                                                       tmp_path: Path) -> None:
    service, model = clip_service
    http = service.http
    images = OLD_ENGINE_MAX_MEMBERS + 10
    upload = many_images_zip(tmp_path / "many.zip", images)
    assert http.get("/v1/capabilities").json()["limits"]["zip_members"] > images  # the API's limit, advertised
    dataset = http.post("/v1/datasets", files={"file": ("many.zip", upload.read_bytes(), "application/zip")})
    assert dataset.status_code == 201, dataset.text
    assert dataset.json()["num_records"] == images

    submitted = http.post("/v1/jobs", json={
        "model": f"local:{model}", "method": "wanda", "sparsity": 0.5,
        "calibration": {"dataset": dataset.json()["id"], "num_samples": 4},
        "evaluation": {"accuracy": False, "perplexity": False}})
    assert submitted.status_code == 201, submitted.text
    job = wait_until_ended(http, submitted.json()["id"], service)
    assert job["status"] == "succeeded", f"{job['error']}{service.log_tail()}"
    assert job["metrics"]["sparsity"]["achieved"] == 0.5
