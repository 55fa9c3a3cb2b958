"""A multipart upload copied to a file with its size capped and its SHA-256 computed on the way: shared by the
dataset and model uploads, which differ only in their limit and in what they say when it is passed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import UploadFile

from app.errors import Problem

CHUNK = 1 << 20


def copy_capped(upload: UploadFile, dest: Path, limit: int, too_large: Problem) -> tuple[int, str]:
    """(bytes, sha256) of the upload written to dest; `too_large` is raised as soon as more than `limit` bytes came,
    so an oversized upload is never written whole."""
    size, digest = 0, hashlib.sha256()
    with dest.open("wb") as out:
        while chunk := upload.file.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise too_large
            digest.update(chunk)
            out.write(chunk)
    if size == 0:
        raise Problem(422, "invalid_upload", "The uploaded file is empty.", param="file")
    return size, digest.hexdigest()
