"""One pruning job as one function: load, tokenize, evaluate, prune block by block, evaluate, save."""

from __future__ import annotations

import contextlib
import math
import platform
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from workers.pruning import data
from workers.pruning.evaluate import perplexity, sparsity_report
from workers.pruning.methods import get_method
from workers.pruning.models import (
    find_blocks,
    load_model,
    prunable_layers,
    resolve_device,
    save_pretrained_folder,
)
from workers.pruning.patterns import UNSTRUCTURED
from workers.pruning.sequential import prune_sequential
from workers.pruning.spec import JobCancelled, JobError, Progress, PruneSpec, Result

CALIBRATION_BATCH = 4  # windows per forward pass while pruning; the captured activations dominate memory
EVALUATION_BATCH = 4

_MESSAGES = {
    "loading": "Loading the model.",
    "calibration": "Preparing calibration and evaluation data.",
    "evaluation_dense": "Measuring the perplexity of the dense model.",
    "pruning": "Pruning block by block.",
    "evaluation_pruned": "Measuring the perplexity of the pruned model.",
    "saving": "Saving the pruned model.",
}


def _ignore(_progress: Progress) -> None:
    return None


def _never() -> bool:
    return False


def run(spec: PruneSpec, output_dir: Path, on_progress: Callable[[Progress], None] = _ignore,
        should_cancel: Callable[[], bool] = _never) -> Result:
    method = get_method(spec.method)
    _check(spec)
    device = resolve_device(spec.device)
    memory = _PeakMemory(device)
    timings: dict[str, float] = {}

    @contextmanager
    def stage(name: str, total: int = 1) -> Iterator[None]:
        if should_cancel():
            raise JobCancelled(f"cancelled before {name}")
        on_progress(Progress(name, 0, total, _MESSAGES[name]))
        start = time.perf_counter()
        yield
        timings[name] = round(time.perf_counter() - start, 3)

    with stage("loading"):
        loaded = load_model(Path(spec.model_dir), device)
        model = loaded.model
        _, blocks = find_blocks(model)
        layer_names = list(prunable_layers(model))

    calibration = evaluation = None
    dataset_info: dict[str, Any] = {}
    if method.new_stats is not None or spec.evaluation.perplexity:
        with stage("calibration"):
            calibration, evaluation, dataset_info = _windows(spec, method.new_stats is not None,
                                                             loaded.tokenizer)

    ppl: dict[str, float | None] = {}
    if evaluation is not None:
        with stage("evaluation_dense"):
            ppl["dense"] = _finite(perplexity(model, evaluation, EVALUATION_BATCH, should_cancel))

    with stage("pruning", total=len(blocks)):
        def block_done(done: int, total: int) -> None:
            on_progress(Progress("pruning", done, total, f"Pruned block {done} of {total}."))

        prune_sequential(model, blocks, method, spec.sparsity, spec.pattern, calibration, CALIBRATION_BATCH,
                         on_block=block_done, should_cancel=should_cancel)

    if evaluation is not None:
        with stage("evaluation_pruned"):
            ppl["pruned"] = _finite(perplexity(model, evaluation, EVALUATION_BATCH, should_cancel))

    sparsity = sparsity_report(model, layer_names)
    with stage("saving"):
        save_pretrained_folder(model, loaded.tokenizer, output_dir)

    metrics: dict[str, Any] = {
        "sparsity": {"target": spec.sparsity, "achieved": round(sparsity["achieved"], 6),
                     "per_layer": {name: round(value, 6) for name, value in sparsity["per_layer"].items()}},
        **({"perplexity": ppl} if ppl else {}),
        "timings_s": timings,
        "peak_memory_mb": memory.peak_mb(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_pruned_parameters": sparsity["num_zeros"],
    }
    report = {
        **metrics,
        "layers": sparsity["layers"],
        "num_prunable_parameters": sparsity["num_prunable_parameters"],
        "spec": _plain(asdict(spec)),
        "model": {"source": loaded.source, "num_blocks": len(blocks),
                  "dtype": str(next(model.parameters()).dtype)},
        "data": dataset_info,
        "environment": _environment(device, memory),
    }
    return Result(output_dir=output_dir, metrics=metrics, report=report)


def _windows(spec: PruneSpec, calibrate: bool,
             tokenizer: Any) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, Any]]:
    """Calibration windows (when the method needs them) and evaluation windows, from one token stream."""
    cal, ev = spec.calibration, spec.evaluation
    tokens = data.token_stream(cal.dataset, tokenizer)
    calibration = evaluation = None
    if calibrate:
        calibration = data.calibration_windows(tokens, cal.num_samples, cal.seq_len, cal.seed)
    if ev.perplexity:
        evaluation = data.evaluation_windows(tokens, ev.num_samples, ev.seq_len)
    # Calibration starts in the second half of the tokens: a longer evaluation reaches into it.
    overlap = (calibration is not None and evaluation is not None
               and evaluation.numel() > tokens.numel() // 2)
    return calibration, evaluation, {"dataset": cal.dataset, "num_tokens": tokens.numel(),
                                     "evaluation_overlaps_calibration": overlap}


def _environment(device: torch.device, memory: _PeakMemory) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "transformers": _transformers_version(),
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "peak_rss_mb": memory.peak_rss_mb(),
    }


def _check(spec: PruneSpec) -> None:
    if not 0.0 < spec.sparsity < 1.0:
        raise JobError("invalid_spec", f"Sparsity must be between 0 and 1 (exclusive); got {spec.sparsity}.")
    if spec.pattern != UNSTRUCTURED:
        raise JobError("unsupported_pattern",
                       f"Pattern {spec.pattern!r} is not available yet; use {UNSTRUCTURED!r}.")


def _finite(value: float) -> float | None:
    # NaN or infinity would make the metrics invalid JSON; None says "not measurable" instead.
    return round(value, 4) if math.isfinite(value) else None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return str(value) if isinstance(value, Path) else value


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


class _PeakMemory:
    """Peak memory of this job alone, although a worker process runs many jobs one after another.

    On Linux the process's high-water mark (VmHWM) can be reset by writing 5 to /proc/self/clear_refs.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # Where this is not Linux or not permitted, the peak covers the process's whole life instead.
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def peak_rss_mb(self) -> int:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024

    def peak_mb(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device) // 2**20)
        return self.peak_rss_mb()
