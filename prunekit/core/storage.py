"""Artifact stores: a local folder (embedded default) and any S3-compatible service (boto3); retries of a store that
cannot be reached."""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from prunekit.core.config import Settings
from prunekit.core.transfer import HashingReader, copy_hashed, s3_transfer_config

log = logging.getLogger("prunekit.storage")
T = TypeVar("T")
# Modes of what a LocalStore writes, whatever the writer's umask: the API reads the files a worker stored, and the
# two may run as different users. Who may reach the store at all is decided by the store root's own mode (and its
# parent's), which the operator sets; the store never changes a folder it did not create.
FILE_MODE = 0o644
DIR_MODE = 0o755


class ArtifactStore(Protocol):
    # Stores the file, read once and one piece at a time, and returns the sha256 of the bytes it read.
    def put_file(self, key: str, path: Path, content_type: str) -> str: ...
    # A stored file stored again under another key, within the store (no bytes through the caller).
    def copy(self, source_key: str, key: str, content_type: str) -> None: ...
    def download_file(self, key: str, dest: Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list_keys(self, prefix: str) -> list[str]: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def delete(self, key: str) -> None: ...  # one file; no error when it is not there


def safe_key(key: str) -> str:
    """Keys are relative POSIX paths; anything that could climb out of the store is refused."""
    parts = key.split("/")
    if any(p in ("", ".", "..") or "\\" in p for p in parts):
        raise ValueError(f"invalid storage key: {key!r}")
    return key


@dataclass
class LocalStore:
    root: Path

    def path_for(self, key: str) -> Path:
        return self.root / safe_key(key)

    def put_file(self, key: str, path: Path, content_type: str) -> str:
        dest = self.path_for(key)
        _make_folders(dest.parent)
        # An unpredictable name of our own beside the destination (so the rename is atomic): nobody can plant or
        # guess it, and two writers of one key never share it.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            digest = copy_hashed(path, tmp)
            tmp.chmod(FILE_MODE)  # mkstemp makes it private, and save_pretrained's files may be 0600 too
            tmp.replace(dest)  # readers never see a half-written artifact
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return digest

    def copy(self, source_key: str, key: str, content_type: str) -> None:
        source, dest = self.path_for(source_key), self.path_for(key)
        _make_folders(dest.parent)
        tmp = dest.with_name(f".{dest.name}.{os.urandom(8).hex()}.partial")
        try:
            # A second name for the same bytes where the file system allows it (the source is never written again:
            # a stored file is replaced whole, under a new inode); else a streamed copy.
            try:
                os.link(source, tmp)
            except OSError:
                shutil.copyfile(source, tmp)
                tmp.chmod(FILE_MODE)
            tmp.replace(dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def download_file(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path_for(key), dest)  # in kernel-sized pieces (sendfile on Linux), never whole

    def exists(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def list_keys(self, prefix: str) -> list[str]:
        base = self.root / safe_key(prefix) if prefix else self.root
        if not base.exists():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        for key in keys:
            self.path_for(key).unlink(missing_ok=True)
        return len(keys)

    def delete(self, key: str) -> None:
        self.path_for(key).unlink(missing_ok=True)


def _make_folders(folder: Path) -> None:
    """The missing folders up to `folder`, each DIR_MODE whatever the umask; existing ones are left as they are."""
    missing: list[Path] = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for each in reversed(missing):
        try:
            each.mkdir()
        except FileExistsError:  # another writer made it meanwhile
            continue
        each.chmod(DIR_MODE)


@dataclass
class S3Store:
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str = "us-east-1"
    public_endpoint_url: str | None = None
    # Files this size or larger go up (and come down) in parts of this size, several at once (S3_PART_SIZE_MB).
    part_size_mb: int = 64

    def __post_init__(self) -> None:
        self.transfer_config = s3_transfer_config(self.part_size_mb)
        self.client = self._client(self.endpoint_url)
        self.public_client = self._client(self.public_endpoint_url) if self.public_endpoint_url else self.client

    def _client(self, endpoint_url: str | None):  # type: ignore[no-untyped-def]
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=self.region,
            # A connect timeout well under botocore's 60 s: an endpoint that swallows packets must not hold a call
            # (five tries) for minutes, or no retry window (retrying) would mean anything.
            config=Config(signature_version="s3v4", retries={"max_attempts": 5, "mode": "standard"},
                          connect_timeout=10, s3={"addressing_style": "path"}),
        )

    def _full(self, key: str) -> str:
        key = safe_key(key)
        return f"{self.prefix.rstrip('/')}/{key}" if self.prefix else key

    def put_file(self, key: str, path: Path, content_type: str) -> str:
        # From the open file rather than its name: the transfer manager then reads the parts in order, one at a
        # time, and the reader hashes them on the way (one read of a multi-GB shard, not one to hash it and
        # another to send it).
        with path.open("rb") as fh:
            reader = HashingReader(fh)
            self.client.upload_fileobj(reader, self.bucket, self._full(key),
                                       ExtraArgs={"ContentType": content_type}, Config=self.transfer_config)
            return reader.hexdigest()

    def copy(self, source_key: str, key: str, content_type: str) -> None:
        # The transfer manager's managed copy: one CopyObject, or for a file of part size or more UploadPartCopy
        # parts (S3 copies at most 5 GB in one request); the bytes never leave the store.
        self.client.copy({"Bucket": self.bucket, "Key": self._full(source_key)}, self.bucket, self._full(key),
                         ExtraArgs={"ContentType": content_type, "MetadataDirective": "REPLACE"},
                         Config=self.transfer_config)

    def download_file(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Parts fetched with ranged GETs and written to a temporary file beside dest, renamed when complete.
        self.client.download_file(self.bucket, self._full(key), str(dest), Config=self.transfer_config)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._full(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def list_keys(self, prefix: str) -> list[str]:
        # A prefix names a folder: "t/job_1" must not match "t/job_10".
        full = self._full(prefix) + "/" if prefix else (self.prefix.rstrip("/") + "/" if self.prefix else "")
        strip = len(self.prefix.rstrip("/")) + 1 if self.prefix else 0
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        for start in range(0, len(keys), 1000):
            chunk = keys[start:start + 1000]
            self.client.delete_objects(Bucket=self.bucket,
                                       Delete={"Objects": [{"Key": self._full(k)} for k in chunk]})
        return len(keys)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._full(key))  # S3 answers 204 for a missing key

    def presigned_url(self, key: str, filename: str, expires_s: int) -> str:
        return self.public_client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._full(key),
                    "ResponseContentDisposition": f'attachment; filename="{filename}"'},
            ExpiresIn=expires_s,
        )


class StorageUnavailable(Exception):
    """The artifact store could not be reached for a whole retry window."""


# S3 answers that mean "down or overloaded, ask again later" rather than "this request is wrong".
_RETRYABLE_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                              "ThrottlingException", "RequestLimitExceeded"})


def unreachable(exc: BaseException) -> bool:
    """Whether an error of a store call says the store cannot be reached (connection refused or closed, timeouts,
    5xx, throttling), as opposed to a wrong request (a missing key or bucket, access denied). boto3 wraps some
    errors (S3UploadFailedError), so the chain of causes is searched."""
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, BotoConnectionError | HTTPClientError | IncompleteReadError | ConnectionError
                      | TimeoutError):
            return True
        if isinstance(current, ClientError):
            error = current.response.get("Error", {})
            status = current.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return status >= 500 or error.get("Code") in _RETRYABLE_CODES
        current = current.__cause__ or current.__context__
    return False


def retrying(call: Callable[[], T], window_s: float, what: str,
             on_retry: Callable[[BaseException, float], None] | None = None,
             sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
             first_delay_s: float = 0.5, max_delay_s: float = 8.0) -> T:
    """call() again, with a growing jittered pause, while the store cannot be reached, for at most window_s from the
    first failure; StorageUnavailable after that. Other errors are raised at once. on_retry(error, pause) runs before
    each pause: where a caller checks it may still go on (its lease) and tells the user.

    boto3 retries each call a few times by itself, for under a second against a refused connection and up to
    S3Store's connect timeout per try against one that never answers, so the last attempt may end after the window."""
    deadline: float | None = None
    delay = first_delay_s
    while True:
        try:
            return call()
        except Exception as exc:
            if not unreachable(exc):
                raise
            now = clock()
            deadline = now + window_s if deadline is None else deadline
            if now >= deadline:
                raise StorageUnavailable(f"The artifact store could not be reached for {window_s:g} s while "
                                         f"{what} ({type(exc).__name__}: {exc}).") from exc
            # Jitter: workers that lost the store together do not all come back at the same instant.
            pause = min(delay * random.uniform(0.5, 1.0), deadline - now)
            log.warning("artifact store unreachable while %s, retrying in %.1f s: %s", what, pause, exc)
            if on_retry is not None:
                on_retry(exc, pause)
            sleep(pause)
            delay = min(delay * 2, max_delay_s)


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    rest = url.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix.strip("/")


def make_store(settings: Settings) -> ArtifactStore:
    if settings.artifact_store.startswith("s3://"):
        bucket, prefix = parse_s3_url(settings.artifact_store)
        return S3Store(bucket=bucket, prefix=prefix, endpoint_url=settings.s3_endpoint_url,
                       region=settings.s3_region, public_endpoint_url=settings.s3_public_endpoint_url,
                       part_size_mb=settings.s3_part_size_mb)
    return LocalStore(root=Path(settings.artifact_store).resolve())
