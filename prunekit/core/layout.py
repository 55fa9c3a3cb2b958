"""The artifact store's key layout, in one place: every key a job, a dataset or the score cache uses.

    {tenant}/{job}/attempt-{n}/...      a job's published files, one folder per attempt
    {tenant}/{job}/checkpoints/...      the engine's checkpoints while the job runs
    {tenant}/datasets/{dataset}/{file}  an uploaded dataset
    {tenant}/models/{model}/{file}      a tenant's uploaded model (an HF folder, flat)
    {tenant}/score-cache/...            allocation scores, shared by the tenant's jobs

Everything a job stores lies under its job prefix, so removing that prefix removes all of it; a tenant's datasets
and score cache lie beside its jobs, never under one (job ids and the two folder names cannot collide).
"""

from __future__ import annotations

from collections.abc import Iterable

ATTEMPT_FOLDER = "attempt-"


def job_prefix(tenant_id: str, job_id: str) -> str:
    return f"{tenant_id}/{job_id}"


def attempt_prefix(tenant_id: str, job_id: str, attempt: int) -> str:
    # Each attempt uploads under its own prefix: an attempt that lost its lease cannot overwrite the files that
    # the rows of the winning attempt describe.
    return f"{job_prefix(tenant_id, job_id)}/{ATTEMPT_FOLDER}{attempt}"


def attempt_prefixes(keys: Iterable[str], tenant_id: str, job_id: str) -> set[str]:
    """The attempt folders that the given keys (of the job's prefix) lie in, at any depth."""
    base = job_prefix(tenant_id, job_id) + "/"
    folders = set()
    for key in keys:
        folder = key.removeprefix(base).split("/", 1)[0] if key.startswith(base) else ""
        if folder.startswith(ATTEMPT_FOLDER) and folder != key.removeprefix(base):  # a folder, not a file
            folders.add(base + folder)
    return folders


def checkpoints_prefix(tenant_id: str, job_id: str) -> str:
    return f"{job_prefix(tenant_id, job_id)}/checkpoints"


def dataset_prefix(tenant_id: str, dataset_id: str) -> str:
    return f"{tenant_id}/datasets/{dataset_id}"


def dataset_key(tenant_id: str, dataset_id: str, file_name: str) -> str:
    return f"{dataset_prefix(tenant_id, dataset_id)}/{file_name}"


def score_cache_prefix(tenant_id: str) -> str:
    return f"{tenant_id}/score-cache"


def model_prefix(tenant_id: str, model_id: str) -> str:
    return f"{tenant_id}/models/{model_id}"
