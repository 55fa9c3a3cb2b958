"""Artifact stores: a local folder (embedded default) and any S3-compatible service (boto3)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from prunekit.core.config import Settings


class ArtifactStore(Protocol):
    def put_file(self, key: str, path: Path, content_type: str) -> None: ...
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

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        dest = self.path_for(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")
        shutil.copyfile(path, tmp)
        tmp.replace(dest)  # readers never see a half-written artifact

    def download_file(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path_for(key), dest)

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


@dataclass
class S3Store:
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str = "us-east-1"
    public_endpoint_url: str | None = None

    def __post_init__(self) -> None:
        self.client = self._client(self.endpoint_url)
        self.public_client = self._client(self.public_endpoint_url) if self.public_endpoint_url else self.client

    def _client(self, endpoint_url: str | None):  # type: ignore[no-untyped-def]
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=self.region,
            config=Config(signature_version="s3v4", retries={"max_attempts": 5, "mode": "standard"},
                          s3={"addressing_style": "path"}),
        )

    def _full(self, key: str) -> str:
        key = safe_key(key)
        return f"{self.prefix.rstrip('/')}/{key}" if self.prefix else key

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        self.client.upload_file(str(path), self.bucket, self._full(key), ExtraArgs={"ContentType": content_type})

    def download_file(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.client.download_file(self.bucket, self._full(key), str(dest))

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


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    rest = url.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix.strip("/")


def make_store(settings: Settings) -> ArtifactStore:
    if settings.artifact_store.startswith("s3://"):
        bucket, prefix = parse_s3_url(settings.artifact_store)
        return S3Store(bucket=bucket, prefix=prefix, endpoint_url=settings.s3_endpoint_url,
                       region=settings.s3_region, public_endpoint_url=settings.s3_public_endpoint_url)
    return LocalStore(root=Path(settings.artifact_store).resolve())
