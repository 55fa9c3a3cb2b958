"""Pure parts of issue #18's storage faults and file modes: which errors are retried and how long, what a failed job
is told, and the modes of what the stores and the engine write under a strict umask."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunekit.core.storage import LocalStore, StorageUnavailable, retrying, unreachable
from workers.failures import describe, disk_full
from workers.pruning.allocation.cache import FolderScoreCache
from workers.pruning.checkpoint import FolderFiles
from workers.pruning.models import save_pretrained_folder


def client_error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


def upload_failed(status: int, code: str) -> S3UploadFailedError:
    """As boto3's upload_file raises it: an S3UploadFailedError raised while handling the ClientError."""
    try:
        raise client_error(status, code)
    except ClientError as exc:
        try:
            raise S3UploadFailedError(f"Failed to upload: {exc}")  # noqa: B904 (boto3 raises it without `from`)
        except S3UploadFailedError as wrapped:
            return wrapped


@pytest.mark.parametrize(("exc", "expected"), [
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
    (ConnectionClosedError(endpoint_url="http://127.0.0.1:1"), True),
    (ConnectionRefusedError(111, "refused"), True),
    (client_error(503, "SlowDown"), True),
    (client_error(500, "InternalError"), True),
    (upload_failed(503, "ServiceUnavailable"), True),
    (client_error(404, "NoSuchBucket"), False),
    (client_error(403, "AccessDenied"), False),
    (upload_failed(403, "AccessDenied"), False),
    (ValueError("invalid storage key"), False),
    (OSError(errno.ENOSPC, "No space left on device"), False),
])
def test_only_an_unreachable_store_is_worth_retrying(exc: BaseException, expected: bool) -> None:
    assert unreachable(exc) is expected


class Clock:
    """Time that passes only when slept: the retry loop's pauses, counted."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


def test_an_outage_shorter_than_the_window_is_waited_out_with_growing_pauses() -> None:
    clock, calls, notified = Clock(), [], []

    def put() -> str:
        calls.append(clock.now)
        if clock.now < 20:
            raise EndpointConnectionError(endpoint_url="http://s3")
        return "stored"

    result = retrying(put, 60, "uploading x", on_retry=lambda exc, pause: notified.append(pause),
                      sleep=clock.sleep, clock=lambda: clock.now)
    assert result == "stored" and notified == clock.pauses and 20 <= clock.now < 28
    assert all(p <= 8.0 for p in clock.pauses) and clock.pauses[-1] > clock.pauses[0]  # backoff, capped


def test_an_outage_longer_than_the_window_ends_in_storage_unavailable_on_time() -> None:
    clock = Clock()

    def put() -> None:
        raise EndpointConnectionError(endpoint_url="http://s3")

    with pytest.raises(StorageUnavailable, match=r"could not be reached for 30 s while uploading model"):
        retrying(put, 30, "uploading model", sleep=clock.sleep, clock=lambda: clock.now)
    assert clock.now == pytest.approx(30)  # the last pause ends exactly at the window, not a backoff later


def test_a_wrong_request_is_not_retried() -> None:
    clock = Clock()

    def put() -> None:
        raise client_error(403, "AccessDenied")

    with pytest.raises(ClientError):
        retrying(put, 30, "uploading model", sleep=clock.sleep, clock=lambda: clock.now)
    assert clock.pauses == []


@pytest.mark.parametrize(("exc", "code"), [
    (OSError(errno.ENOSPC, "No space left on device"), "disk_full"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk_full"),
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), "disk_full"),
    (StorageUnavailable("The artifact store could not be reached for 120 s while uploading model.safetensors."),
     "storage_unavailable"),
    (EndpointConnectionError(endpoint_url="http://s3"), "storage_unavailable"),
    (RuntimeError("something else"), "internal_error"),
    (OSError(errno.EACCES, "Permission denied"), "internal_error"),
])
def test_a_failed_job_is_told_what_happened(exc: BaseException, code: str) -> None:
    got, message = describe(exc)
    assert got == code
    if code == "disk_full":
        assert disk_full(exc) and "ran out of disk space" in message and "WORK_DIR" in message
    elif code == "storage_unavailable":
        assert "submit it again once the store is back" in message
    else:
        assert message == f"{type(exc).__name__}: {exc}"


# --- modes ------------------------------------------------------------------------------------------------------


@pytest.fixture
def strict_umask() -> Iterator[None]:
    """A service manager's umask (systemd's UMask=0077): whatever relies on the umask comes out private."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def private_file(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    path.chmod(0o600)
    return path


def test_local_store_files_are_readable_by_others_whatever_the_umask(tmp_path: Path, strict_umask: None) -> None:
    root = tmp_path / "store"
    root.mkdir()
    root.chmod(0o750)  # the operator's choice for the root; the store leaves it alone
    source = private_file(tmp_path / "model.safetensors", b"weights")
    LocalStore(root).put_file("ten_a/job_1/attempt-1/sub/model.safetensors", source, "application/octet-stream")

    stored = root / "ten_a/job_1/attempt-1/sub/model.safetensors"
    assert stored.read_bytes() == b"weights" and mode(stored) == 0o644
    assert [mode(p) for p in (root / "ten_a", root / "ten_a/job_1", stored.parent)] == [0o755] * 3
    assert mode(root) == 0o750
    assert [p.name for p in stored.parent.iterdir()] == ["model.safetensors"]  # no temporary file left


def test_engine_checkpoint_and_cache_folders_are_written_whole_and_readable(tmp_path: Path,
                                                                           strict_umask: None) -> None:
    files = FolderFiles(tmp_path / "checkpoint")
    files.put("state.json", private_file(tmp_path / "state.json", b"{}"))
    FolderScoreCache(tmp_path / "cache").put("abc", {"scores": [1.0]})
    assert [p.name for p in (tmp_path / "checkpoint").iterdir()] == ["state.json"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["abc.json"]
    assert mode(tmp_path / "checkpoint" / "state.json") == mode(tmp_path / "cache" / "abc.json") == 0o644


def test_a_saved_model_is_readable_by_others_although_safetensors_writes_0600(tiny_llama_dir: Path, tmp_path: Path,
                                                                              strict_umask: None) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    dest = tmp_path / "out" / "model"
    save_pretrained_folder(model, tokenizer, dest)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in dest.iterdir()}
    assert mode(dest) == 0o755 and all(mode(p) == 0o644 for p in dest.iterdir())
