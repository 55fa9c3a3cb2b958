"""Settings: the one place that reads the environment."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from prunekit.vocabulary import (
    ARCHIVE_LIMITS,
    MAX_MODEL_UPLOAD_BYTES,
    MAX_UPLOAD_BYTES,
    MODEL_ARCHIVE_LIMITS,
    OUTPUT_SHARD_BYTES,
    ArchiveLimits,
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False, populate_by_name=True)

    var_dir: Path = Field(default=Path("var"), alias="PRUNEKIT_VAR_DIR")
    database_url: str = ""
    broker_url: str = ""
    artifact_store: str = ""
    s3_endpoint_url: str | None = None
    # Where clients reach S3 when it differs from where the services do (e.g. minio inside docker-compose).
    s3_public_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    # Files this size (MiB) or larger go to S3 in parts of this size, several at once; one upload holds at most five
    # parts in memory. S3 takes parts of 5 MiB to 5 GiB and at most 10,000 of them (boto3 enlarges the parts of a
    # file that would need more).
    s3_part_size_mb: int = Field(default=64, ge=5, le=5120)
    models_root: Path | None = None
    hf_cache_dir: Path | None = None
    work_dir: Path | None = None
    queue_name: str = "prunekit"
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # API processes `prunekit serve` runs (uvicorn workers). More than one needs the rate-limit counters in Redis.
    api_workers: int = Field(default=1, ge=1)
    log_level: str = "info"
    device: str = "auto"
    max_page_size: int = 100
    webhook_max_attempts: int = 8
    webhook_backoff_s: float = 5.0
    webhook_timeout_s: float = 10.0
    # Webhooks to loopback, private, link-local (cloud metadata) and other non-public addresses are refused, at
    # submission and again when sent; true for receivers on a private network (and the tests' local receivers).
    webhook_allow_private_hosts: bool = False
    # Deliveries have a queue of their own ("<queue_name>-webhooks" when unset), consumed by `prunekit worker
    # --webhooks`, so that a finished job's webhook never waits behind a job that runs for hours.
    webhook_queue_name: str = ""
    # Concurrent deliveries of one webhook consumer (threads: a delivery waits on the network, not the CPU).
    webhook_concurrency: int = Field(default=8, ge=1)
    rate_limit_per_minute: int = 1200
    job_create_limit_per_minute: int = 120
    # Where the per-tenant counters live: Redis shares them across API replicas; "memory" for one process.
    rate_limit_url: str = ""
    # Each API process remembers keys that authenticated for this long, so most requests skip the key query; a key
    # revoked by `prunekit keys revoke` (another process) is refused everywhere within it. 0 turns the cache off.
    api_key_cache_ttl_s: float = Field(default=5.0, ge=0)
    presign_expiry_s: int = 3600
    # Uploaded datasets (POST /v1/datasets): a bigger body answers 413; the rest of a bad upload 422. The API checks
    # an upload with the archive limits and the worker reads it with the same ones (archive_limits()), so that a
    # dataset stored with a 201 can be used by every job.
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_dataset_records: int = ARCHIVE_LIMITS.max_records
    max_zip_members: int = ARCHIVE_LIMITS.max_members
    max_zip_uncompressed_bytes: int = ARCHIVE_LIMITS.max_total_bytes
    max_zip_member_bytes: int = ARCHIVE_LIMITS.max_member_bytes
    max_zip_compression_ratio: float = ARCHIVE_LIMITS.max_ratio
    max_caption_chars: int = ARCHIVE_LIMITS.max_text_chars
    max_image_pixels: int = ARCHIVE_LIMITS.max_image_pixels
    max_dataset_pixels: int = ARCHIVE_LIMITS.max_total_pixels
    # A tenant's model (POST /v1/models): the archive's size (413 above it), its files and their expanded bytes.
    max_model_upload_bytes: int = MAX_MODEL_UPLOAD_BYTES
    max_model_files: int = MODEL_ARCHIVE_LIMITS.max_members
    max_model_bytes: int = MODEL_ARCHIVE_LIMITS.max_total_bytes
    # A model the worker writes (the pruned model) goes out in Hugging Face's sharded layout, shards of at most
    # this many MB (a single tensor larger than that gets a shard of its own).
    output_shard_mb: int = Field(default=OUTPUT_SHARD_BYTES // 2**20, ge=1)
    # A job whose model (as loaded for compute: fp32 on a CPU worker) is larger than this many MB is streamed from
    # disk block by block instead of loaded whole. Unset: a share (MEMORY_BUDGET_SHARE) of the memory available
    # when the worker runs its first job.
    worker_memory_budget_mb: int | None = Field(default=None, ge=1)
    # Reliability: a worker holds a job by a lease in the database, renewed every job_lease_s / 3; a lease
    # left to expire (the worker died) lets the reconciler hand the job to another worker.
    job_lease_s: float = 60.0
    # How often each worker re-sends jobs the broker lost (queued ones, and running ones whose lease expired).
    reconcile_interval_s: float = 30.0
    # Jobs of one tenant running at once; more wait `queued` and are claimed as slots free up.
    max_running_jobs_per_tenant: int = 2
    # A job saves its progress to the artifact store every this many pruned blocks (0: never), so that a job
    # taken over after a crash resumes from its last saved block instead of starting again.
    checkpoint_every_blocks: int = Field(default=1, ge=0)
    # How long a worker keeps retrying (with backoff) an artifact store it cannot reach while uploading a job's
    # files, counted from the first failure of one outage; then the job fails with `storage_unavailable`.
    storage_retry_s: float = Field(default=120.0, ge=0)
    # Attempts a job gets. An attempt that ends without its worker reporting (the worker was killed: the kernel's
    # out-of-memory killer, most often, and again on every retry) counts; once this many did, the job ends
    # `failed` with `out_of_memory` instead of being handed from worker to worker forever.
    job_max_attempts: int = Field(default=3, ge=1)
    # While the database is unreachable, a running job waits between blocks, retrying its writes, this long; then
    # the attempt stops without writing (the next resumes from its checkpoint).
    database_patience_s: float = Field(default=300.0, ge=0)

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        # Every default lives under one folder so that `make run` needs no servers and a fresh clone
        # works anywhere; production overrides each by environment.
        var = self.var_dir.resolve()
        self.var_dir = var
        if not self.database_url:
            self.database_url = f"sqlite:///{var / 'prunekit.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{var / 'broker.db'}"
        if not self.artifact_store:
            self.artifact_store = str(var / "artifacts")
        if not self.webhook_queue_name:
            self.webhook_queue_name = f"{self.queue_name}-webhooks"
        if not self.rate_limit_url:
            self.rate_limit_url = self.broker_url if self.broker_url.startswith("redis") else "memory"
        self.models_root = (self.models_root or var / "models").resolve()
        self.hf_cache_dir = (self.hf_cache_dir or var / "hf-cache").resolve()
        self.work_dir = (self.work_dir or var / "work").resolve()
        return self

    def archive_limits(self) -> ArchiveLimits:
        """What an uploaded dataset may hold: the API checks uploads with it, the worker hands it to the engine."""
        return ArchiveLimits(max_records=self.max_dataset_records, max_members=self.max_zip_members,
                             max_total_bytes=self.max_zip_uncompressed_bytes,
                             max_member_bytes=self.max_zip_member_bytes, max_ratio=self.max_zip_compression_ratio,
                             max_text_chars=self.max_caption_chars, max_image_pixels=self.max_image_pixels,
                             max_total_pixels=self.max_dataset_pixels)

    def model_archive_limits(self) -> ArchiveLimits:
        """What a tenant's model archive may hold (POST /v1/models)."""
        return ArchiveLimits(max_members=self.max_model_files, max_total_bytes=self.max_model_bytes,
                             max_member_bytes=self.max_model_bytes, max_ratio=MODEL_ARCHIVE_LIMITS.max_ratio)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    return Settings()
