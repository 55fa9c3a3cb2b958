"""The models API against real Postgres, a real local store and a real S3 endpoint (moto): a tiny
Llama uploaded as .zip and .tar and registered as an s3:// prefix, listed beside the server's models; hostile and
broken archives refused with problem+json naming the field; tenancy; a model in use cannot be deleted."""

from __future__ import annotations

import io
import json
import secrets
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from prunekit.core.config import Settings
from tests.conftest import REDIS_URL

TINY_LLAMA_PARAMETERS = 222_016  # 1024 x 64 embeddings and head, two blocks of width 64 (2 of 4 heads for k, v)


@pytest.fixture
def settings(pg_url: str, queue_name: str, tmp_path: Path, models_root: Path, s3_endpoint: str) -> Settings:
    # The session's models root, with a real tiny Llama the list describes.
    return Settings(PRUNEKIT_VAR_DIR=tmp_path, database_url=pg_url, broker_url=REDIS_URL, queue_name=queue_name,
                    models_root=models_root, s3_endpoint_url=s3_endpoint)


@pytest.fixture(scope="module")
def tiny_files(models_root: Path) -> dict[str, bytes]:
    folder = models_root / "tiny-llama"
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def make_zip(files: dict[str, bytes], root: str = "tiny-llama/") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(root + name, data)
    return buffer.getvalue()


def make_tar(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return buffer.getvalue()


def upload(client: TestClient, auth: dict[str, str], filename: str, content: bytes, **form: str) -> Any:
    return client.post("/v1/models", files={"file": (filename, content, "application/octet-stream")}, data=form,
                       headers=auth)


def problem(response: Any, status: int, code: str, param: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert (body["code"], body["param"], body["status"]) == (code, param, status), body
    return str(body["detail"])


def with_config(files: dict[str, bytes], **changes: Any) -> dict[str, bytes]:
    config = json.loads(files["config.json"])
    config.update(changes)
    return {**files, "config.json": json.dumps(config).encode()}


def test_upload_list_get_delete(client: TestClient, auth: dict[str, str], tiny_files: dict[str, bytes],
                                settings: Settings) -> None:
    created = upload(client, auth, "my-llama.zip", make_zip(tiny_files))
    assert created.status_code == 201, created.text
    model = created.json()
    assert model["id"].startswith("mdl_") and model["ref"] == model["id"] and model["object"] == "model"
    assert (model["name"], model["owner"], model["source"], model["status"], model["ready"]) == \
        ("my-llama", "tenant", "upload", "ready", True)
    assert (model["family"], model["model_type"], model["parameters"], model["towers"], model["dtype"]) == \
        ("llama", "llama", TINY_LLAMA_PARAMETERS, ["language"], "float32")
    assert model["size_bytes"] == sum(len(v) for v in tiny_files.values())
    stored = settings.var_dir / "artifacts"
    assert sorted(p.name for p in stored.rglob("*") if p.is_file()) == sorted(tiny_files)

    listed = client.get("/v1/models", headers=auth).json()
    server = [m for m in listed["data"] if m["owner"] == "server"]
    assert {"ref": "local:tiny-llama", "ready": True, "family": "llama", "parameters": TINY_LLAMA_PARAMETERS,
            "towers": ["language"], "dtype": "float32"}.items() <= next(
        m for m in server if m["ref"] == "local:tiny-llama").items()
    assert [m["id"] for m in listed["data"] if m["owner"] == "tenant"] == [model["id"]]
    assert client.get(f"/v1/models/{model['id']}", headers=auth).json() == model

    as_tar = upload(client, auth, "again.tar", make_tar(tiny_files), name="tarred")
    assert as_tar.status_code == 201, as_tar.text
    assert (as_tar.json()["name"], as_tar.json()["parameters"]) == ("tarred", TINY_LLAMA_PARAMETERS)

    assert client.delete(f"/v1/models/{model['id']}", headers=auth).status_code == 204
    problem(client.get(f"/v1/models/{model['id']}", headers=auth), 404, "model_not_found", "id")
    assert len([p for p in stored.rglob("*") if p.is_file()]) == len(tiny_files)  # the tar's copy only


HOSTILE: dict[str, tuple[Callable[[dict[str, bytes]], tuple[str, bytes]], str]] = {
    "pickled weights": (lambda f: ("m.zip", make_zip({**f, "pytorch_model.bin": b"\x80\x04K\x01."})),
                        "'pytorch_model.bin' is a pickled checkpoint"),
    "a code file": (lambda f: ("m.zip", make_zip({**f, "modeling_evil.py": b"import os\n"})),
                    "'modeling_evil.py' is code"),
    "auto_map in config": (lambda f: ("m.zip", make_zip(with_config(f, auto_map={"AutoModel": "evil.Model"}))),
                           "config.json: auto_map asks for the model's own code"),
    "trust_remote_code in the tokenizer config": (
        lambda f: ("m.zip", make_zip({**f, "tokenizer_config.json": json.dumps(
            {"tokenizer_class": "X", "nested": {"trust_remote_code": True}}).encode()})),
        "tokenizer_config.json: nested.trust_remote_code"),
    "a path out of the archive": (lambda f: ("m.zip", make_zip(f, root="../../")), "points outside the archive"),
    "a symbolic link": (lambda f: ("m.tar", make_tar(f, links={"vocab.json": "/etc/passwd"})), "is a link"),
    "an absolute tar path": (lambda f: ("m.tar", make_tar({"/tmp/config.json": f["config.json"]})),
                             "points outside the archive"),
    "no archive at all": (lambda f: ("m.zip", b"not a zip"), "cannot be read as a zip file"),
    "another file type": (lambda f: ("m.zip", make_zip({**f, "weights.onnx": b"x"})),
                          "'weights.onnx' is not a file of an HF model folder"),
    "no weights": (lambda f: ("m.zip", make_zip({k: v for k, v in f.items() if not k.endswith(".safetensors")})),
                   "no .safetensors weights"),
    "a config that is not JSON": (lambda f: ("m.zip", make_zip({**f, "config.json": b"{model_type: llama"})),
                                  "config.json is not valid JSON"),
    "a family not served": (lambda f: ("m.zip", make_zip(with_config(f, model_type="bert"))),
                            "model_type 'bert' is not a family this service prunes"),
    "a size that is no number": (lambda f: ("m.zip", make_zip(with_config(f, hidden_size="large"))),
                                 "hidden_size must be a positive integer"),
    "weights wider than the config": (lambda f: ("m.zip", make_zip(with_config(f, hidden_size=128, head_dim=32))),
                                      "makes it [1024, 128]: the weights are not of the model the config describes"),
    "fewer layers than the config": (lambda f: ("m.zip", make_zip(with_config(f, num_hidden_layers=3))),
                                     "num_hidden_layers is 3, but the weights hold 2"),
    "a corrupt safetensors header": (
        lambda f: ("m.zip", make_zip({**f, "model.safetensors": (10**12).to_bytes(8, "little") + b"{}"})),
        "model.safetensors is not a safetensors file"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_and_broken_archives_are_refused(case: str, client: TestClient, auth: dict[str, str],
                                                 tiny_files: dict[str, bytes], settings: Settings) -> None:
    build, expected = HOSTILE[case]
    name, content = build(tiny_files)
    detail = problem(upload(client, auth, name, content), 422, "invalid_upload", "file")
    assert expected in detail, detail
    assert not [p for p in (settings.var_dir / "artifacts").rglob("*") if p.is_file()]  # nothing stored
    assert client.get("/v1/models", headers=auth).json()["data"][-1]["owner"] == "server"


def test_archive_limits(settings: Settings, new_key: Callable[[str], str], tiny_files: dict[str, bytes]) -> None:
    small = settings.model_copy(update={"max_model_files": 6, "max_model_bytes": 920_000,
                                        "max_model_upload_bytes": 3_000_000})
    with TestClient(create_app(small), raise_server_exceptions=False) as client:
        auth = {"Authorization": f"Bearer {new_key('limits')}"}
        many = {**tiny_files, **{f"extra-{i}.txt": b"x" for i in range(5)}}
        assert "entries; at most 6" in problem(upload(client, auth, "m.zip", make_zip(many)), 422, "invalid_upload",
                                               "file")
        assert "expands to" in problem(upload(client, auth, "m.tar", make_tar(tiny_files)), 422, "invalid_upload",
                                       "file")
        huge = upload(client, auth, "m.tar", b"\0" * 3_100_000)
        problem(huge, 413, "upload_too_large", "file")


def test_file_or_source_and_tenancy(client: TestClient, auth: dict[str, str], new_key: Callable[[str], str],
                                    tiny_files: dict[str, bytes]) -> None:
    problem(client.post("/v1/models", data={"name": "x"}, headers=auth), 422, "invalid_request", "file")
    both = client.post("/v1/models", files={"file": ("m.zip", make_zip(tiny_files))},
                       data={"source": "s3://bucket/x"}, headers=auth)
    problem(both, 422, "invalid_request", "source")
    problem(upload(client, auth, "model.7z", b"x"), 422, "invalid_upload", "file")

    model = upload(client, auth, "mine.zip", make_zip(tiny_files)).json()
    other = {"Authorization": f"Bearer {new_key('tenant-b')}"}
    problem(client.get(f"/v1/models/{model['id']}", headers=other), 404, "model_not_found", "id")
    problem(client.delete(f"/v1/models/{model['id']}", headers=other), 404, "model_not_found", "id")
    assert all(m["owner"] == "server" for m in client.get("/v1/models", headers=other).json()["data"])
    job = client.post("/v1/jobs", json={"model": model["id"], "method": "magnitude", "sparsity": 0.5}, headers=other)
    assert "No model" in problem(job, 422, "unknown_model", "model")


def test_a_model_in_use_is_not_deleted(client: TestClient, auth: dict[str, str],
                                       tiny_files: dict[str, bytes]) -> None:
    model = upload(client, auth, "mine.zip", make_zip(tiny_files)).json()
    job = client.post("/v1/jobs", json={"model": model["id"], "method": "magnitude", "sparsity": 0.5}, headers=auth)
    assert job.status_code == 201, job.text  # queued: no worker runs here
    assert job.json()["request"]["model"] == model["id"]
    assert job.json()["id"] in problem(client.delete(f"/v1/models/{model['id']}", headers=auth), 409,
                                       "model_in_use", "id")
    assert client.post(f"/v1/jobs/{job.json()['id']}/cancel", headers=auth).json()["status"] == "cancelled"
    assert client.delete(f"/v1/models/{model['id']}", headers=auth).status_code == 204


def test_chained_references_are_checked_at_submission(client: TestClient, auth: dict[str, str]) -> None:
    queued = client.post("/v1/jobs", json={"model": "local:tiny-llama", "method": "magnitude", "sparsity": 0.5},
                         headers=auth).json()
    body = {"method": "magnitude", "sparsity": 0.6}
    not_done = client.post("/v1/jobs", json={**body, "model": f"job:{queued['id']}"}, headers=auth)
    assert "has not succeeded (queued)" in problem(not_done, 422, "model_not_ready", "model")
    unknown = client.post("/v1/jobs", json={**body, "model": "job:job_" + "0" * 26}, headers=auth)
    problem(unknown, 422, "unknown_model", "model")
    bad = client.post("/v1/jobs", json={**body, "model": "job:nope"}, headers=auth)
    problem(bad, 422, "invalid_request", "model")


@pytest.fixture
def bucket(s3_endpoint: str) -> Iterator[Any]:
    name = f"models-{secrets.token_hex(4)}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=name)
    yield s3, name


def test_an_s3_prefix_is_registered_after_the_same_checks(client: TestClient, auth: dict[str, str], bucket: Any,
                                                          tiny_files: dict[str, bytes]) -> None:
    s3, name = bucket
    for file_name, data in tiny_files.items():
        s3.put_object(Bucket=name, Key=f"llama/{file_name}", Body=data)
        s3.put_object(Bucket=name, Key=f"pickled/{file_name}", Body=data)
    s3.put_object(Bucket=name, Key="pickled/pytorch_model.bin", Body=b"\x80\x04K\x01.")
    created = client.post("/v1/models", data={"source": f"s3://{name}/llama"}, headers=auth)
    assert created.status_code == 201, created.text
    assert (created.json()["source"], created.json()["name"], created.json()["parameters"]) == \
        (f"s3://{name}/llama", "llama", TINY_LLAMA_PARAMETERS)
    refused = client.post("/v1/models", data={"source": f"s3://{name}/pickled"}, headers=auth)
    assert "pickled checkpoint" in problem(refused, 422, "invalid_model", "source")
    empty = client.post("/v1/models", data={"source": f"s3://{name}/nothing"}, headers=auth)
    assert "no files" in problem(empty, 422, "invalid_model", "source")
    missing = client.post("/v1/models", data={"source": f"s3://no-such-{name}/x"}, headers=auth)
    assert "could not be read" in problem(missing, 422, "invalid_model", "source")
