"""Multi-GB artifacts at test scale: a file larger than S3_PART_SIZE_MB goes to a real S3 endpoint (moto server) in
parts, read once, its sha256 taken on the way and recorded on the artifact; a local artifact is downloaded through
the HTTP API by ranges."""

from __future__ import annotations

import hashlib
import random
import secrets
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from fastapi.testclient import TestClient

from app.auth import create_key, get_or_create_tenant
from app.main import create_app
from prunekit.core.config import Settings
from prunekit.core.db import queries
from prunekit.core.db.models import Artifact
from prunekit.core.db.session import migrate, session_scope
from prunekit.core.storage import ArtifactStore, LocalStore, S3Store, make_store
from prunekit.core.transfer import MIB, HashingReader
from workers.lease import Lease
from workers.publish import StoredCopy, publish

PART = 5 * MIB  # S3's smallest part
SIZE = 12_000_000  # two parts of 5 MiB and one of 1,514,240 bytes


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "model-00001-of-00002.safetensors"
    path.write_bytes(random.Random(14).randbytes(SIZE))
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def new_bucket(endpoint: str) -> str:
    bucket = f"prunekit-mp-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket


def publish_one(settings: Settings, store: ArtifactStore, tenant_id: str, name: str, path: Path,
                copy_of: StoredCopy | None = None, copied: bool = False) -> Artifact:
    """`path` published as job's only artifact the way a worker does it (a claimed job, its lease, publish()); the
    artifact's row as recorded."""
    owner = f"test-{secrets.token_hex(4)}"
    with session_scope(settings) as session:
        job, _ = queries.create_job(session, tenant_id, {"model": "local:x", "method": "wanda", "sparsity": 0.5},
                                    {}, None)
        assert queries.claim_job(session, job.id, owner, 60, 2) == "claimed"
        job_id, attempt = job.id, job.attempts
    publish(Lease(job_id, owner, attempt, settings), store, tenant_id, {name: path},
            {name: copy_of} if copy_of is not None else None)
    with session_scope(settings) as session:
        [artifact] = queries.list_artifacts(session, job_id)
        session.expunge(artifact)
        [stored] = [e for e in queries.list_events(session, job_id, None, 1000)[0] if e.message.startswith("Stored")]
        assert stored.data["copied"] == ([name] if copied else []), stored.data
    return artifact


def test_a_file_larger_than_a_part_goes_up_in_parts_with_its_sha256_recorded(
        s3_endpoint: str, tmp_path: Path, big_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S3_PART_SIZE_MB", "5")
    bucket = new_bucket(s3_endpoint)
    settings = Settings(PRUNEKIT_VAR_DIR=tmp_path, artifact_store=f"s3://{bucket}/artifacts",
                        s3_endpoint_url=s3_endpoint)
    assert settings.s3_part_size_mb == 5
    migrate(settings.database_url)
    store = make_store(settings)
    assert isinstance(store, S3Store)
    with session_scope(settings) as session:
        tenant_id = get_or_create_tenant(session, f"mp-{secrets.token_hex(4)}").id

    artifact = publish_one(settings, store, tenant_id, "model-00001-of-00002.safetensors", big_file)
    data = big_file.read_bytes()
    assert artifact.sha256 == sha256(data) and artifact.size_bytes == SIZE

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    head = s3.head_object(Bucket=bucket, Key=f"artifacts/{artifact.storage_key}")
    # A multipart upload's ETag is the MD5 of its parts' MD5s followed by "-<parts>": ceil(12,000,000 / 5 MiB) = 3.
    assert head["ETag"].strip('"').endswith("-3") and head["ContentLength"] == SIZE
    parts = [s3.head_object(Bucket=bucket, Key=f"artifacts/{artifact.storage_key}", PartNumber=n)["ContentLength"]
             for n in (1, 2, 3)]
    assert parts == [PART, PART, SIZE - 2 * PART]

    back = tmp_path / "back" / "model.safetensors"
    store.download_file(artifact.storage_key, back)
    assert back.read_bytes() == data


def test_a_shard_the_checkpoint_holds_is_copied_in_parts_within_the_store(
        s3_endpoint: str, tmp_path: Path, big_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A streamed job's output shard, already in the store as its checkpoint saved it, is published by a copy inside
    S3 (in parts: UploadPartCopy), with the sha256 taken when the checkpoint uploaded it."""
    monkeypatch.setenv("S3_PART_SIZE_MB", "5")
    bucket = new_bucket(s3_endpoint)
    settings = Settings(PRUNEKIT_VAR_DIR=tmp_path, artifact_store=f"s3://{bucket}/artifacts",
                        s3_endpoint_url=s3_endpoint)
    migrate(settings.database_url)
    store = make_store(settings)
    with session_scope(settings) as session:
        tenant_id = get_or_create_tenant(session, f"mp-{secrets.token_hex(4)}").id
    saved_key = f"{tenant_id}/checkpoint-of-another-job/output-{big_file.name}"
    digest = store.put_file(saved_key, big_file, "application/octet-stream")

    artifact = publish_one(settings, store, tenant_id, big_file.name, big_file, StoredCopy(saved_key, digest),
                           copied=True)
    data = big_file.read_bytes()
    assert artifact.sha256 == sha256(data) and artifact.size_bytes == SIZE
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    head = s3.head_object(Bucket=bucket, Key=f"artifacts/{artifact.storage_key}")
    assert head["ETag"].strip('"').endswith("-3") and head["ContentType"] == "application/octet-stream"
    back = tmp_path / "back" / big_file.name
    store.download_file(artifact.storage_key, back)
    assert back.read_bytes() == data

    # The checkpoint's file gone (removed with an ended attempt, say): the file is uploaded instead, not lost.
    store.delete(saved_key)
    again = publish_one(settings, store, tenant_id, big_file.name, big_file, StoredCopy(saved_key, digest))
    assert again.sha256 == sha256(data)
    store.download_file(again.storage_key, back)
    assert back.read_bytes() == data


@pytest.mark.parametrize(("size", "parts"), [(0, None), (300_000, None), (PART, 1), (SIZE, 3)])
def test_the_upload_reads_the_file_once_and_hashes_it(s3_endpoint: str, big_file: Path, tmp_path: Path,
                                                      size: int, parts: int | None) -> None:
    """What put_file relies on: boto3's transfer manager, given an open file, reads it in order, each byte once
    (under the part size: one PutObject, whose body botocore may read again to checksum it, and the hash takes
    those bytes once all the same)."""
    store = S3Store(bucket=new_bucket(s3_endpoint), endpoint_url=s3_endpoint, part_size_mb=5)
    path = tmp_path / "part.bin"
    with big_file.open("rb") as fh:
        path.write_bytes(fh.read(size))
    data = path.read_bytes()

    with path.open("rb") as fh:
        reader = HashingReader(fh)
        store.client.upload_fileobj(reader, store.bucket, "k", Config=store.transfer_config)
        if parts is not None:
            assert reader.bytes_read == size
        assert reader.hexdigest() == sha256(data)
        if parts is not None:
            assert reader.bytes_read == size  # nothing left for hexdigest() to read

    etag = store.client.head_object(Bucket=store.bucket, Key="k")["ETag"].strip('"')
    assert etag.endswith(f"-{parts}") if parts else "-" not in etag
    assert store.put_file("again", path, "application/octet-stream") == sha256(data)
    store.download_file("again", tmp_path / "again.bin")
    assert (tmp_path / "again.bin").read_bytes() == data


@pytest.fixture
def local_api(tmp_path: Path) -> Iterator[tuple[TestClient, Settings, str, dict[str, str]]]:
    """The API in process on the embedded stack (SQLite, a local artifact folder): client, settings, tenant, auth."""
    settings = Settings(PRUNEKIT_VAR_DIR=tmp_path)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        with session_scope(settings) as session:
            name = f"range-{secrets.token_hex(4)}"
            key = create_key(session, name)
            tenant_id = get_or_create_tenant(session, name).id
        yield client, settings, tenant_id, {"Authorization": f"Bearer {key}"}


def test_a_local_artifact_downloads_by_ranges_through_the_api(
        local_api: tuple[TestClient, Settings, str, dict[str, str]], big_file: Path) -> None:
    client, settings, tenant_id, auth = local_api
    store = make_store(settings)
    assert isinstance(store, LocalStore)
    artifact = publish_one(settings, store, tenant_id, "model-00001-of-00002.safetensors", big_file)
    data = big_file.read_bytes()
    assert artifact.sha256 == sha256(data)
    url = f"/v1/artifacts/{artifact.id}/content"

    # Across several of the server's 64 KiB reads, from the middle of the file.
    response = client.get(url, headers={**auth, "Range": "bytes=1000000-1199999"})
    assert response.status_code == 206, response.text
    assert response.content == data[1_000_000:1_200_000]
    assert response.headers["content-range"] == f"bytes 1000000-1199999/{SIZE}"
    assert response.headers["content-length"] == "200000"

    tail = client.get(url, headers={**auth, "Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == data[-10:]
    rest = client.get(url, headers={**auth, "Range": f"bytes={SIZE - 5}-"})
    assert rest.status_code == 206 and rest.content == data[-5:]
    beyond = client.get(url, headers={**auth, "Range": f"bytes={SIZE}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{SIZE}"

    digest = hashlib.sha256()
    with client.stream("GET", url, headers=auth) as whole:
        assert whole.status_code == 200 and whole.headers["x-content-sha256"] == artifact.sha256
        for chunk in whole.iter_bytes():
            digest.update(chunk)
    assert digest.hexdigest() == sha256(data)
