"""Uploaded datasets against real Postgres and a real local store: kinds, limits, hostile archives, tenancy."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from prunekit.core.config import Settings

PNG_1x1 = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")


def upload(client: TestClient, auth: dict[str, str], name: str, content: bytes) -> Any:
    return client.post("/v1/datasets", files={"file": (name, content, "application/octet-stream")}, headers=auth)


def problem(response: Any, status: int, param: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["param"] == param and body["status"] == status
    return body


def make_zip(entries: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return buffer.getvalue()


def captions(*pairs: tuple[str, str]) -> bytes:
    return "\n".join(json.dumps({"image": image, "text": text}) for image, text in pairs).encode()


def test_text_upload_is_counted_stored_listed_and_deleted(client: TestClient, auth: dict[str, str]) -> None:
    content = b"first line\n\nsecond line\nthird\n"
    created = upload(client, auth, "notes.txt", content)
    assert created.status_code == 201, created.text
    ds = created.json()
    assert ds["id"].startswith("ds_") and ds["object"] == "dataset"
    assert (ds["kind"], ds["num_records"], ds["size_bytes"]) == ("text", 3, len(content))
    assert ds["sha256"] == hashlib.sha256(content).hexdigest() and ds["name"] == "notes.txt"
    assert client.get(f"/v1/datasets/{ds['id']}", headers=auth).json() == ds
    assert [d["id"] for d in client.get("/v1/datasets", headers=auth).json()["data"]] == [ds["id"]]
    assert client.delete(f"/v1/datasets/{ds['id']}", headers=auth).status_code == 204
    problem(client.get(f"/v1/datasets/{ds['id']}", headers=auth), 404, "id")


def test_jsonl_needs_a_text_field_on_every_line(client: TestClient, auth: dict[str, str]) -> None:
    good = upload(client, auth, "d.jsonl", b'{"text": "a"}\n{"text": "b", "other": 1}\n')
    assert good.status_code == 201 and good.json()["num_records"] == 2
    body = problem(upload(client, auth, "d.jsonl", b'{"text": "a"}\n{"txt": "b"}\n'), 422, "file")
    assert "line 2" in body["detail"] and "'text'" in body["detail"]
    assert "line 1 is not valid JSON" in problem(upload(client, auth, "d.jsonl", b"{oops\n"), 422, "file")["detail"]
    problem(upload(client, auth, "d.jsonl", b""), 422, "file")
    problem(upload(client, auth, "d.parquet", b"PAR1"), 422, "file")
    problem(upload(client, auth, "d.txt", b"\xff\xfe not utf-8"), 422, "file")


def test_image_text_archive_is_accepted(client: TestClient, auth: dict[str, str]) -> None:
    archive = make_zip({"data.jsonl": captions(("img/0.png", "a photo of the digit 0"),
                                               ("img/1.png", "a photo of the digit 1")),
                        "img/0.png": PNG_1x1, "img/1.png": PNG_1x1})
    created = upload(client, auth, "digits.zip", archive)
    assert created.status_code == 201, created.text
    assert (created.json()["kind"], created.json()["num_records"]) == ("image-text", 2)


@pytest.mark.parametrize(("archive", "reason"), [
    (make_zip({"data.jsonl": captions(("../evil.png", "x")), "../evil.png": PNG_1x1}), "outside the archive"),
    (make_zip({"data.jsonl": captions(("/etc/x.png", "x")), "/etc/x.png": PNG_1x1}), "outside the archive"),
    (make_zip({"data.jsonl": captions(("a.png", "x"))}, links={"a.png": "/etc/passwd"}), "symbolic link"),
    (make_zip({"data.jsonl": captions(("a.png", "x")), "a.png": PNG_1x1, "pad.bin": bytes(5_000_000)}),
     "zip bomb"),
    (make_zip({"data.jsonl": captions(("missing.png", "x"))}), "not in the archive"),
    (make_zip({"captions.jsonl": captions(("a.png", "x")), "a.png": PNG_1x1}), "no data.jsonl"),
    (make_zip({"data.jsonl": captions(("a.txt", "x")), "a.txt": b"hi"}), "not a PNG or JPEG"),
    (b"PK\x03\x04 truncated", "cannot be read as a zip"),
])
def test_hostile_or_broken_archives_are_refused(client: TestClient, auth: dict[str, str], archive: bytes,
                                                reason: str) -> None:
    assert reason in problem(upload(client, auth, "data.zip", archive), 422, "file")["detail"]


@pytest.fixture
def small_limits_client(settings: Settings) -> Iterator[TestClient]:
    tight = settings.model_copy(update={"max_upload_bytes": 2000, "max_dataset_records": 5, "max_zip_members": 3})
    with TestClient(create_app(tight), raise_server_exceptions=False) as c:
        yield c


def test_size_record_and_member_caps(small_limits_client: TestClient, auth: dict[str, str]) -> None:
    client = small_limits_client
    body = problem(upload(client, auth, "big.txt", b"x" * 5000), 413, "file")
    assert "2000 bytes" in body["detail"]
    assert "more than 5 records" in problem(upload(client, auth, "many.txt", b"a\n" * 6), 422, "file")["detail"]
    archive = make_zip({"data.jsonl": captions(("a.png", "x")), "a.png": PNG_1x1, "b.png": PNG_1x1,
                        "c.png": PNG_1x1})
    assert "4 entries; at most 3" in problem(upload(client, auth, "d.zip", archive), 422, "file")["detail"]
    assert client.get("/v1/capabilities", headers=auth).json()["limits"]["upload_bytes"] == 2000


def test_datasets_are_private_to_their_tenant(client: TestClient, auth: dict[str, str],
                                              new_key: Callable[[str], str]) -> None:
    ds = upload(client, auth, "mine.txt", b"private words\n").json()
    other = {"Authorization": f"Bearer {new_key('tenant-b')}"}
    problem(client.get(f"/v1/datasets/{ds['id']}", headers=other), 404, "id")
    problem(client.delete(f"/v1/datasets/{ds['id']}", headers=other), 404, "id")
    assert client.get("/v1/datasets", headers=other).json()["data"] == []
    job = {"model": "local:tiny-llama", "method": "wanda", "sparsity": 0.5, "calibration": {"dataset": ds["id"]}}
    problem(client.post("/v1/jobs", json=job, headers=other), 422, "calibration.dataset")
    # The owner may use it, and cannot delete it while a job that uses it has not ended.
    created = client.post("/v1/jobs", json=job, headers=auth)
    assert created.status_code == 201, created.text
    assert problem(client.delete(f"/v1/datasets/{ds['id']}", headers=auth), 409, "id")["code"] == "dataset_in_use"
    client.post(f"/v1/jobs/{created.json()['id']}/cancel", headers=auth)
    assert client.delete(f"/v1/datasets/{ds['id']}", headers=auth).status_code == 204


def test_unknown_dataset_reference_is_refused(client: TestClient, auth: dict[str, str]) -> None:
    job = {"model": "local:tiny-llama", "method": "wanda", "sparsity": 0.5}
    problem(client.post("/v1/jobs", json={**job, "calibration": {"dataset": "ds_01J0000000000000000000000Z"}},
                        headers=auth), 422, "calibration.dataset")
    problem(client.post("/v1/jobs", json={**job, "calibration": {"dataset": "/etc/passwd"}}, headers=auth),
            422, "calibration.dataset")


def test_restore_dataset_is_checked_against_the_tenant_and_keeps_the_upload_in_use(
        client: TestClient, auth: dict[str, str], new_key: Callable[[str], str]) -> None:
    ds = upload(client, auth, "domain.txt", b"words of my domain\n").json()
    job = {"model": "local:tiny-llama", "method": "wanda", "sparsity": 0.5, "restore": {"dataset": ds["id"]}}
    other = {"Authorization": f"Bearer {new_key('tenant-b')}"}
    assert problem(client.post("/v1/jobs", json=job, headers=other), 422, "restore.dataset")["code"] == (
        "dataset_not_found")
    problem(client.post("/v1/jobs", json={**job, "restore": {"dataset": "ds_01J0000000000000000000000Z"}},
                        headers=auth), 422, "restore.dataset")
    created = client.post("/v1/jobs", json=job, headers=auth)
    assert created.status_code == 201, created.text
    assert created.json()["request"]["restore"]["dataset"] == ds["id"]
    assert problem(client.delete(f"/v1/datasets/{ds['id']}", headers=auth), 409, "id")["code"] == "dataset_in_use"
    client.post(f"/v1/jobs/{created.json()['id']}/cancel", headers=auth)
    assert client.delete(f"/v1/datasets/{ds['id']}", headers=auth).status_code == 204


def test_restore_dataset_must_fit_the_local_model(client: TestClient, auth: dict[str, str],
                                                  settings: Settings) -> None:
    assert settings.models_root is not None
    (settings.models_root / "tiny-llama" / "config.json").write_text('{"model_type": "llama"}')
    (settings.models_root / "tiny-clip").mkdir()
    (settings.models_root / "tiny-clip" / "config.json").write_text('{"model_type": "clip"}')
    llama = {"model": "local:tiny-llama", "method": "wanda", "sparsity": 0.5}
    body = problem(client.post("/v1/jobs", json={**llama, "restore": {"dataset": "builtin:digits"}}, headers=auth),
                   422, "restore.dataset")
    assert body["code"] == "incompatible_dataset" and "restore dataset" in body["detail"]
    clip = {**llama, "model": "local:tiny-clip"}
    problem(client.post("/v1/jobs", json={**clip, "restore": {"batch_size": 1}}, headers=auth), 422,
            "restore.batch_size")
    problem(client.post("/v1/jobs", json={**clip, "restore": {"dataset": "builtin:wiki-en"}}, headers=auth), 422,
            "restore.dataset")
    created = client.post("/v1/jobs", json={**clip, "restore": {"dataset": "builtin:digits", "batch_size": 8}},
                          headers=auth)
    assert created.status_code == 201, created.text
    client.post(f"/v1/jobs/{created.json()['id']}/cancel", headers=auth)
