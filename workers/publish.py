"""A finished attempt's files uploaded to the artifact store and recorded as the job's artifacts."""

from __future__ import annotations

import hashlib
import mimetypes
from pathlib import Path

from prunekit.core import layout, lifecycle
from prunekit.core.storage import ArtifactStore
from workers.lease import Lease, LeaseLost


def publish(lease: Lease, store: ArtifactStore, tenant_id: str, files: dict[str, Path]) -> None:
    """Uploads under the attempt's own prefix, records the rows while the lease holds, then removes what earlier,
    interrupted attempts left behind. An attempt that lost its lease removes its own upload instead."""
    job_id = lease.job_id
    prefix = layout.attempt_prefix(tenant_id, job_id, lease.attempt)
    stored = []
    lease.check()
    for name, path in files.items():
        key = f"{prefix}/{name}"
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        store.put_file(key, path, content_type)
        stored.append(lifecycle.StoredFile(name=name, key=key, size_bytes=path.stat().st_size,
                                           sha256=sha256_file(path), content_type=content_type))
    try:
        with lease.session() as session:
            lifecycle.publish(session, job_id, tenant_id, stored)
    except LeaseLost:
        store.delete_prefix(prefix)
        raise
    job_keys = store.list_keys(layout.job_prefix(tenant_id, job_id))
    for stale in layout.attempt_prefixes(job_keys, tenant_id, job_id) - {prefix}:
        store.delete_prefix(stale)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
