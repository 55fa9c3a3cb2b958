"""A job's request (as the API stored it) as the engine's plain-data PruneSpec, with what the deployment's settings
add: the device, the archive limits the API checked the job's uploaded datasets with, the worker's memory budget
and the output's shard size."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from prunekit.core.config import Settings
from prunekit.vocabulary import ALLOCATION, MEMORY_BUDGET_SHARE, OFFLOAD, PATTERN, ArchiveLimits, offload_mode
from workers.pruning.spec import AllocationSpec, BudgetSpec, CalibrationSpec, EvaluationSpec, PruneSpec, RestoreSpec


def build_spec(request: dict[str, Any], model_dir: Path, settings: Settings) -> PruneSpec:
    # Read with the limits the upload was accepted with: a dataset stored with a 201 is one every job can read.
    limits = settings.archive_limits()
    return PruneSpec(
        model_dir=model_dir,
        method=request["method"],
        # A budget job's sparsity is null in the request (the search chooses it): the grid's lowest stands in.
        sparsity=float(request["sparsity"] if request.get("sparsity") is not None
                       else request["budget"]["min_sparsity"]),
        pattern=request.get("pattern", PATTERN),
        calibration=CalibrationSpec(**request.get("calibration", {}), archive_limits=limits),
        evaluation=EvaluationSpec(**request.get("evaluation", {})),
        device=settings.device,
        targets=request.get("targets"),
        offload=offload_mode(request.get("offload", OFFLOAD)),
        allocation=AllocationSpec(name=request.get("allocation", ALLOCATION.name),
                                  **{key: value for key, value in (request.get("allocation_options") or {}).items()}),
        sweep=tuple(float(s) for s in (request.get("sweep") or {}).get("sparsities", ())),
        restore=restore_spec(request.get("restore"), limits),
        budget=BudgetSpec(**request["budget"]) if request.get("budget") else None,
        memory_budget_mb=memory_budget_mb(settings),
        output_shard_bytes=settings.output_shard_mb * 2**20,
    )


def memory_budget_mb(settings: Settings) -> int | None:
    """WORKER_MEMORY_BUDGET_MB, or a share of the memory this worker found available (None where unknown)."""
    if settings.worker_memory_budget_mb is not None:
        return settings.worker_memory_budget_mb
    available = _available_mb()
    return None if available is None else int(available * MEMORY_BUDGET_SHARE)


@functools.cache
def _available_mb() -> int | None:
    """MemAvailable, read once per worker process: later jobs find it lowered by what earlier ones left cached."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def restore_spec(options: dict[str, Any] | None, archive_limits: ArchiveLimits | None = None) -> RestoreSpec | None:
    """The request's restore object (defaults filled in by the API) as the engine's RestoreSpec."""
    if options is None:
        return None
    targets = options.get("targets")
    extra = {} if archive_limits is None else {"archive_limits": archive_limits}
    return RestoreSpec(**{**options, "targets": tuple(targets) if targets is not None else None, **extra})
