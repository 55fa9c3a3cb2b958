"""The engine's checkpoints kept in the artifact store (layout.checkpoints_prefix) for the job's life; removed with the
job's other files when it ends (prunekit/core/lifecycle.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from prunekit.core import layout
from prunekit.core.db import queries
from prunekit.core.storage import ArtifactStore
from workers.lease import Lease
from workers.pruning.checkpoint import Checkpoint, CheckpointError, Resume
from workers.publish import StoredCopy

log = logging.getLogger("prunekit.worker")


@dataclass
class StoreFiles:
    """CheckpointFiles on an artifact store. Writes prove the lease first: a worker that lost the job must
    not overwrite the files of the one that took it over."""

    store: ArtifactStore
    prefix: str
    lease: Lease

    def put(self, name: str, path: Path) -> str:
        self.lease.check()
        try:
            return self.store.put_file(self.key(name), path, "application/octet-stream")
        except Exception as exc:  # an S3 blip costs this checkpoint, not the job
            raise CheckpointError(f"could not store {name}: {exc}") from exc

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def get(self, name: str, dest: Path) -> bool:
        key = self.key(name)
        if not self.store.exists(key):
            return False
        self.store.download_file(key, dest)
        return True


def checkpoint_for(lease: Lease, store: ArtifactStore, tenant_id: str, scratch: Path) -> Checkpoint | None:
    settings = lease.settings
    if settings.checkpoint_every_blocks <= 0:
        return None
    files = StoreFiles(store, layout.checkpoints_prefix(tenant_id, lease.job_id), lease)
    return Checkpoint(files, scratch, settings.checkpoint_every_blocks, on_resume=lambda r: _resumed(lease, r))


def stored_output(checkpoint: Checkpoint | None, folder: Path) -> dict[str, StoredCopy]:
    """The pruned model's files (by their names in `folder`) that the job's checkpoint already holds in the store:
    a streamed run's output shards, saved once as they were completed."""
    if checkpoint is None or not isinstance(checkpoint.files, StoreFiles):
        return {}
    files = checkpoint.files
    return {name: StoredCopy(files.key(saved.name), saved.sha256)
            for name, saved in checkpoint.stored_output(folder).items()}


def _resumed(lease: Lease, resume: Resume) -> None:
    log.info("job %s resumes from block %d of tower %s", lease.job_id, resume.block, resume.tower)
    with lease.session() as session:
        queries.add_event(session, lease.job_id, f"Resumed from block {resume.block} of tower {resume.tower} "
                                                 f"({resume.done} blocks were already pruned).",
                          data={"tower": resume.tower, "block": resume.block, "blocks_done": resume.done,
                                "checkpoint_bytes": resume.size_bytes})

