"""Every limit of the contract: request sizes, and what an uploaded dataset may hold.

ArchiveLimits are the defaults of settings both sides read (prunekit.core.config.Settings.archive_limits): the API
checks an upload with them and the worker hands the same values to the engine, which reads the archive with them.
"""

from __future__ import annotations

from dataclasses import dataclass

# Bounds of a job request's fields (GET /v1/capabilities lists them).
LIMITS: dict[str, int] = {
    "calibration_num_samples": 1024,
    "calibration_seq_len": 4096,
    "evaluation_num_samples": 1024,
    "evaluation_seq_len": 4096,
    "allocation_num_samples": 256,
    "sweep_sparsities": 10,
    "restore_steps": 100_000,
    "restore_rank": 256,
    "restore_batch_size": 256,
    "metadata_keys": 16,
    "metadata_value_chars": 512,
    "list_page_size": 100,
    # evaluation.tasks and the items scored of each.
    "evaluation_tasks": 8,
    "evaluation_task_num_samples": 2000,
}

# An uploaded file's size (POST /v1/datasets); a bigger body answers 413.
MAX_UPLOAD_BYTES = 256 * 2**20


@dataclass(frozen=True)
class ArchiveLimits:
    """What an uploaded dataset may hold. An image-text archive is checked against all of them by the API (except
    the pixel counts, which only decoding tells) and read with the same values by the engine."""

    max_records: int = 1_000_000
    max_members: int = 100_000
    max_total_bytes: int = 2 * 2**30  # uncompressed, all members together
    max_member_bytes: int = 64 * 2**20  # uncompressed, any one member (data.jsonl included)
    # Uncompressed / compressed size of one member; PNG and JPEG barely compress, text ~10x. More is a zip bomb.
    max_ratio: float = 200.0
    # The engine lets a member this small expand further (it harms no one); the API refuses it all the same.
    ratio_floor_bytes: int = 2**20
    max_text_chars: int = 10_000  # one caption
    max_image_pixels: int = 4096 * 4096  # one image, from its header, before it is decoded
    max_total_pixels: int = 2**28  # all images together: ~800 MB of decoded RGB


ARCHIVE_LIMITS = ArchiveLimits()


# --- a tenant's model (POST /v1/models): an archive of an HF folder --------------------------------------
# The upload itself (a bigger body answers 413), and what its archive may hold; safetensors barely compress, so
# the expanded size is about the upload's.
MAX_MODEL_UPLOAD_BYTES = 8 * 2**30
MODEL_ARCHIVE_LIMITS = ArchiveLimits(max_members=256, max_total_bytes=8 * 2**30, max_member_bytes=8 * 2**30,
                                     max_ratio=200.0)


# --- one item of an uploaded task file (the API checks them at upload, the engine as it reads them) -
TASK_LIMITS: dict[str, int] = {
    "choices": 26,  # choices of one item
    "chars": 20_000,  # characters of one item's context or of one choice
}


# --- a model the engine writes (the pruned model): Hugging Face's sharded layout, shards of at most this size ---
OUTPUT_SHARD_BYTES = 2 * 1024**3
