"""Allocation scores computed once per (model, data, options): the key they are kept under, the lookup before
scoring and the store after it, and a score cache in a local folder for benchmarks, notebooks and single
machines (the worker keeps its cache in the artifact store instead, workers/score_cache.py)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from workers.pruning.allocation.plan import cache_options, raw_scores, score_inputs
from workers.pruning.allocation.registry import get_allocation
from workers.pruning.allocation.streamed_scoring import Stream
from workers.pruning.checkpoint import digest_path
from workers.pruning.files import write_whole
from workers.pruning.models import Tower
from workers.pruning.multimodal import ModelAdapter
from workers.pruning.sequential import ModelInputs
from workers.pruning.spec import Progress, PruneSpec

# Part of every key: bump it when the raw scores' meaning changes, so that older entries are never read.
KEY_VERSION = 1


class ScoreCache(Protocol):
    """Raw scores by key; get() answers None when absent (or unreadable: the job then scores again)."""

    def get(self, key: str) -> dict[str, Any] | None: ...
    def put(self, key: str, value: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Scores:
    raw: dict[str, Any]  # what the allocation is computed from, as cached
    info: dict[str, Any]  # for metrics["allocation"]: cache hit or miss, key, scoring time, options


def score_cache_key(spec: PruneSpec, towers: Sequence[Tower], options: dict[str, Any], device: torch.device,
                    dtype: torch.dtype) -> str:
    """sha256 of everything the raw scores depend on. Paths count by their contents: a worker fetches the same
    model into a different folder on every attempt. Existing caches are keyed by exactly this identity."""
    dataset = Path(spec.calibration.dataset)
    identity = {"model": digest_path(Path(spec.model_dir)),
                "dataset": digest_path(dataset) if dataset.exists() else spec.calibration.dataset,
                "calibration": {"num_samples": spec.calibration.num_samples, "seq_len": spec.calibration.seq_len},
                "towers": [tower.prefix for tower in towers], "options": options, "device": device.type,
                "dtype": str(dtype), "torch": torch.__version__, "version": KEY_VERSION}
    if get_allocation(spec.allocation.name).data_free:  # scores of the weights alone serve any dataset
        identity["dataset"] = identity["calibration"] = None
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def cached_scores(spec: PruneSpec, model: ModelAdapter, towers: Sequence[Tower], calibration: ModelInputs | None,
                  device: torch.device, cache: ScoreCache | None, should_cancel: Callable[[], bool],
                  on_progress: Callable[[Progress], None], stream: Stream | None = None) -> Scores:
    """The allocation's raw scores, from the cache when an earlier job computed them with the same options.
    stream: the model is streamed from disk; its scores are the in-memory ones, so they share the cache's keys
    (the dtype is the one it computes in either way)."""
    options = cache_options(spec.allocation, spec.calibration.seed)
    key = None
    if cache is not None:
        key = score_cache_key(spec, towers, options, device, next(model.model.parameters()).dtype)
        cached = cache.get(key)
        if cached is not None:
            on_progress(Progress("scoring", 1, 1, f"Used cached {spec.allocation.name} scores (key {key[:12]}); "
                                                  "no scoring pass was needed."))
            return Scores(cached, {"cache": "hit", "cache_key": key, "scoring_s": 0.0, "options": options,
                                   "cached_scoring_s": cached.get("scoring_s")})
    # None: a data-free allocation, for which the job loaded no calibration data
    inputs = score_inputs(model, calibration, spec.allocation) if calibration is not None else None
    start = time.perf_counter()

    def step(done: int, total: int) -> None:
        if done == total or done % 10 == 0:
            on_progress(Progress("scoring", done, total, f"Scored {done} of {total}."))

    raw = raw_scores(model, towers, inputs, spec.allocation, spec.calibration.seed, should_cancel, step, stream)
    seconds = round(time.perf_counter() - start, 3)
    raw["scoring_s"] = seconds  # kept with the scores: a later job that reuses them can say what they cost
    info: dict[str, Any] = {"cache": "miss" if cache is not None else None, "scoring_s": seconds, "options": options}
    if cache is not None and key is not None:
        cache.put(key, raw)
        info["cache_key"] = key
        on_progress(Progress("scoring", 1, 1, f"Stored the {spec.allocation.name} scores in the score cache "
                                              f"(key {key[:12]})."))
    return Scores(raw, info)


@dataclass(frozen=True)
class FolderScoreCache:
    root: Path

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.root / f"{key}.json"
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        write_whole(self.root / f"{key}.json", lambda tmp: tmp.write_text(json.dumps(value), encoding="utf-8"))
