"""A finished attempt's files uploaded to the artifact store and recorded as the job's artifacts."""

from __future__ import annotations

import logging
import mimetypes
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from prunekit.core import layout, lifecycle
from prunekit.core.db import queries
from prunekit.core.storage import ArtifactStore, StorageUnavailable, retrying
from workers.lease import Lease, LeaseLost

log = logging.getLogger("prunekit.worker")
T = TypeVar("T")


@dataclass(frozen=True)
class StoredCopy:
    """A file to publish that the store already holds, byte for byte (a checkpoint's copy of an output shard)."""

    key: str
    sha256: str


def publish(lease: Lease, store: ArtifactStore, tenant_id: str, files: dict[str, Path],
            stored: dict[str, StoredCopy] | None = None) -> None:
    """Uploads under the attempt's own prefix, records the rows while the lease holds, then removes what earlier,
    interrupted attempts left behind. An attempt that lost its lease removes its own upload instead. A file in
    `stored` is copied within the store instead of uploaded again (the artifacts' event says which).

    A store that cannot be reached is retried (STORAGE_RETRY_S per outage) and the upload goes on with the file
    it stopped at; if it stays away, StorageUnavailable ends the job before any row is written."""
    job_id = lease.job_id
    prefix = layout.attempt_prefix(tenant_id, job_id, lease.attempt)
    held = stored or {}
    published = []
    lease.check()
    patient = _Patient(lease, len(files))
    for done, (name, path) in enumerate(files.items()):
        key = f"{prefix}/{name}"
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        left = len(files) - done - 1
        digest = _copied(patient, store, held[name], key, content_type, left) if name in held else None
        copied = digest is not None
        if digest is None:
            # The store hashes the file in the pass that uploads it: a multi-GB shard is read once, not twice.
            digest = patient.call(partial(store.put_file, key, path, content_type), f"uploading {name}", left=left)
        published.append(lifecycle.StoredFile(name=name, key=key, size_bytes=path.stat().st_size, sha256=digest,
                                              content_type=content_type, copied=copied))
    try:
        with lease.session() as session:
            lifecycle.publish(session, job_id, tenant_id, published)
    except LeaseLost:
        store.delete_prefix(prefix)
        raise
    job_keys = patient.call(partial(store.list_keys, layout.job_prefix(tenant_id, job_id)), "listing the job's files")
    for stale in layout.attempt_prefixes(job_keys, tenant_id, job_id) - {prefix}:
        patient.call(partial(store.delete_prefix, stale), "removing an interrupted attempt's files")


def _copied(patient: _Patient, store: ArtifactStore, source: StoredCopy, key: str, content_type: str,
            left: int) -> str | None:
    """The sha256 of a file copied within the store; None when the copy was refused (the checkpoint's file gone,
    say): the file is then uploaded instead. A store away for the whole retry window still ends the job."""
    try:
        patient.call(partial(store.copy, source.key, key, content_type), f"copying {key.rsplit('/', 1)[-1]}",
                     left=left)
    except (StorageUnavailable, LeaseLost):
        raise
    except Exception as exc:
        log.warning("could not copy %s within the store (%s: %s); uploading it instead", source.key,
                    type(exc).__name__, exc)
        return None
    return source.sha256


class _Patient:
    """Store calls retried through an outage; the job's events say when the store went away and came back, and
    every pause first proves the lease (a worker that lost the job stops waiting for the store)."""

    def __init__(self, lease: Lease, files: int) -> None:
        self.lease, self.files = lease, files

    def call(self, call: Callable[[], T], what: str, left: int | None = None) -> T:
        waited: list[float] = []

        def on_retry(exc: BaseException, pause: float) -> None:
            self.lease.check()
            if not waited:
                self._event(f"The artifact store cannot be reached while {what}; retrying for up to "
                            f"{self.lease.settings.storage_retry_s:g} s.",
                            {"error": f"{type(exc).__name__}: {exc}"[:500]})
            waited.append(pause)

        result = retrying(call, self.lease.settings.storage_retry_s, what, on_retry=on_retry)
        if waited:
            rest = f"; the upload goes on ({left} of {self.files} files left)" if left is not None else ""
            self._event(f"The artifact store is back after {len(waited)} retries{rest}.",
                        {"retries": len(waited), **({"files_left": left} if left is not None else {})})
        return result

    def _event(self, message: str, data: dict[str, object]) -> None:
        try:
            with self.lease.session() as session:
                queries.add_event(session, self.lease.job_id, message, level="warning", data=data)
        except LeaseLost:
            raise
        except Exception as exc:  # the database away too: the upload matters more than its note
            log.warning("job %s: could not record %r: %s", self.lease.job_id, message, exc)
