"""What an unexpected exception of a job tells its user: faults of the worker's surroundings (a full scratch disk, an
artifact store that cannot be reached) get a code and a message of their own; anything else is `internal_error`."""

from __future__ import annotations

import errno

from prunekit.core.storage import StorageUnavailable, unreachable
from prunekit.vocabulary.names import DISK_FULL, INTERNAL_ERROR, STORAGE_UNAVAILABLE

# Libraries that write without Python's OSError (safetensors' Rust writer) still carry the OS's words.
_DISK_FULL_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def disk_full(exc: BaseException) -> bool:
    """Whether the exception, or one it was raised from, is a write that found the disk (or the quota) full."""
    for each in _chain(exc):
        if isinstance(each, OSError) and each.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(each) for words in _DISK_FULL_WORDS):
            return True
    return False


def describe(exc: BaseException) -> tuple[str, str]:
    """(code, message) of a job that failed with `exc`, which is no engine JobError."""
    detail = f"{type(exc).__name__}: {exc}"
    if disk_full(exc):
        return DISK_FULL, ("The worker ran out of disk space while writing the job's files (its scratch folder "
                           "WORK_DIR, or a local artifact store); the partial files were removed. Submit the job "
                           f"again once the worker has more room ({detail}).")
    if isinstance(exc, StorageUnavailable):
        return STORAGE_UNAVAILABLE, f"{exc} The job keeps no artifacts; submit it again once the store is back."
    if unreachable(exc):  # the artifact store or an s3:// model's bucket, outside an upload's retries
        return STORAGE_UNAVAILABLE, (f"The storage service could not be reached ({detail}). The job keeps no "
                                     "artifacts; submit it again once the store is back.")
    return INTERNAL_ERROR, detail


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen
