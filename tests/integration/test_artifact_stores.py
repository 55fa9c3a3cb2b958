"""LocalStore and S3Store honour one contract; S3Store runs against a real S3 endpoint (moto server)."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

import boto3
import httpx
import pytest

from prunekit.core.config import Settings
from prunekit.core.storage import LocalStore, S3Store, make_store, safe_key


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> LocalStore | S3Store:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"prunekit-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return S3Store(bucket=bucket, prefix="tenants", endpoint_url=endpoint)


def test_put_list_download_delete(store: LocalStore | S3Store, tmp_path: Path) -> None:
    payload = secrets.token_bytes(300_000)
    src = tmp_path / "model.safetensors"
    src.write_bytes(payload)
    # The sha256 of what was stored comes back from the same read that stored it.
    assert store.put_file("ten_a/job_1/model.safetensors", src, "application/octet-stream") == \
        hashlib.sha256(payload).hexdigest()
    store.put_file("ten_a/job_1/sub/config.json", src, "application/json")
    store.put_file("ten_a/job_10/report.json", src, "application/json")

    assert store.exists("ten_a/job_1/model.safetensors") and not store.exists("ten_a/job_1/missing")
    assert store.list_keys("ten_a/job_1") == ["ten_a/job_1/model.safetensors", "ten_a/job_1/sub/config.json"]
    dest = tmp_path / "back" / "m.safetensors"
    store.download_file("ten_a/job_1/model.safetensors", dest)
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(payload).digest()

    assert store.delete_prefix("ten_a/job_1") == 2
    # A prefix is a folder: job_1's deletion leaves job_10 alone.
    assert store.list_keys("ten_a/job_1") == [] and store.list_keys("ten_a") == ["ten_a/job_10/report.json"]

    store.delete("ten_a/job_10/report.json")
    store.delete("ten_a/job_10/report.json")  # a missing key is no error
    assert store.list_keys("ten_a") == []


def test_copy_within_the_store_outlives_its_source(store: LocalStore | S3Store, tmp_path: Path) -> None:
    payload = secrets.token_bytes(200_000)
    src = tmp_path / "shard.safetensors"
    src.write_bytes(payload)
    store.put_file("ten_a/job_1/checkpoints/output-model.safetensors", src, "application/octet-stream")
    store.copy("ten_a/job_1/checkpoints/output-model.safetensors", "ten_a/job_1/attempt-2/model.safetensors",
               "application/octet-stream")
    store.delete_prefix("ten_a/job_1/checkpoints")  # as the job's end removes its checkpoints
    assert store.list_keys("ten_a/job_1") == ["ten_a/job_1/attempt-2/model.safetensors"]
    dest = tmp_path / "back.safetensors"
    store.download_file("ten_a/job_1/attempt-2/model.safetensors", dest)
    assert dest.read_bytes() == payload


@pytest.mark.parametrize("key", ["../escape", "/abs/path", "a/../../b", "a//b", ""])
def test_keys_cannot_climb_out(key: str) -> None:
    with pytest.raises(ValueError):
        safe_key(key)


def test_presigned_url_serves_the_bytes_with_range(s3_endpoint: str, tmp_path: Path) -> None:
    bucket = f"prunekit-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    store = make_store(Settings(PRUNEKIT_VAR_DIR=tmp_path, artifact_store=f"s3://{bucket}/artifacts",
                                s3_endpoint_url=s3_endpoint))
    assert isinstance(store, S3Store)
    src = tmp_path / "report.json"
    src.write_bytes(b'{"sparsity": 0.5}')
    store.put_file("t/j/report.json", src, "application/json")
    url = store.presigned_url("t/j/report.json", "report.json", expires_s=60)
    assert httpx.get(url).content == b'{"sparsity": 0.5}'
    assert httpx.get(url, headers={"Range": "bytes=1-10"}).content == b'"sparsity"'
    # Objects land under the configured prefix of the bucket.
    listed = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in listed["Contents"]] == ["artifacts/t/j/report.json"]
