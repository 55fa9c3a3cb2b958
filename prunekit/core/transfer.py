"""Moving multi-GB files without holding them: copies and uploads in bounded pieces, their sha256 taken in the
same pass that reads them."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import IO, Any

# One read of a copy or a hash: large enough for the disk's full speed, small enough never to matter in memory.
COPY_BUFFER_BYTES = 1 << 20
MIB = 1 << 20
# S3 refuses parts under 5 MiB (but the last).
S3_MIN_PART_MB = 5
# Parts of one S3 transfer in flight at once. An upload from an open file (how its sha256 is taken as it is read)
# holds each part in memory until S3 has it, so one upload holds at most this many parts plus the one being read:
# 5 x 64 MiB with the default part size, whatever the file's size.
S3_CONCURRENCY = 4


def s3_transfer_config(part_size_mb: int) -> Any:
    """boto3's transfer manager set to cut files of `part_size_mb` or more into parts of that size (it makes the
    parts larger by itself where a file would need more than S3's 10,000)."""
    from boto3.s3.transfer import TransferConfig

    part = max(part_size_mb, S3_MIN_PART_MB) * MIB
    config = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=S3_CONCURRENCY,
                            # The classic manager on every machine: the CRT one (where awscrt is installed) reads
                            # an open file in ways of its own, and its memory is not bounded by the lines above.
                            preferred_transfer_client="classic")
    # Not an argument of boto3's TransferConfig, but an attribute its transfer manager honours.
    config.max_in_memory_upload_chunks = S3_CONCURRENCY
    return config


class HashingReader:
    """An open file handed to an upload, hashed as the upload reads it. The digest takes the file's bytes in order,
    each once, however the reader moves: botocore seeks a body back to checksum it or to send it again, and
    those second reads add nothing. Bytes the upload never read in order (none, with boto3's transfer manager,
    which reads the parts of an open file one after another) are read by hexdigest()."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh
        self._digest = hashlib.sha256()
        self._hashed = 0  # the bytes [0, _hashed) of the file are in the digest
        self.bytes_read = 0  # from the file, every read counted (a second read of the same bytes too)
        self._lock = threading.Lock()  # the transfer manager reads from its threads

    def read(self, size: int | None = -1) -> bytes:
        with self._lock:
            start = self._fh.tell()
            data = self._fh.read(-1 if size is None else size)
            end = start + len(data)
            self.bytes_read += len(data)
            if start <= self._hashed < end:
                self._digest.update(memoryview(data)[self._hashed - start:])
                self._hashed = end
            return data

    def seek(self, offset: int, whence: int = 0) -> int:
        with self._lock:
            return self._fh.seek(offset, whence)

    def tell(self) -> int:
        with self._lock:
            return self._fh.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        """Nothing: s3transfer closes the body of a single-request upload once sent, but the file belongs to whoever
        opened it, and hexdigest() may still need to read it."""

    def hexdigest(self) -> str:
        """The sha256 of the whole file."""
        with self._lock:
            position = self._fh.tell()
            self._fh.seek(self._hashed)
            while chunk := self._fh.read(COPY_BUFFER_BYTES):
                self.bytes_read += len(chunk)
                self._hashed += len(chunk)
                self._digest.update(chunk)
            self._fh.seek(position)
            return self._digest.hexdigest()


def copy_hashed(source: Path, dest: Path) -> str:
    """Copies source to dest (created or truncated) one buffer at a time and returns the sha256 of what it copied:
    one read of the file for both."""
    digest = hashlib.sha256()
    buffer = bytearray(COPY_BUFFER_BYTES)
    view = memoryview(buffer)
    with source.open("rb", buffering=0) as src, dest.open("wb", buffering=0) as out:
        while n := src.readinto(buffer):
            digest.update(view[:n])
            written = 0
            while written < n:  # a raw write may take less than it was given
                written += out.write(view[written:n])
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    """The sha256 of a file, read one buffer at a time."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
