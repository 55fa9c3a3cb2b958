"""One pruning job as one function: load, tokenize, evaluate, prune block by block, evaluate, save."""

from __future__ import annotations

import contextlib
import math
import platform
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from workers.pruning import multimodal
from workers.pruning.checkpoint import Checkpoint, Resume, fingerprint
from workers.pruning.evaluate import perplexity, sparsity_report
from workers.pruning.methods import get_method
from workers.pruning.models import (
    TOWERS,
    Tower,
    find_towers,
    load_model,
    plan_towers,
    resolve_device,
    save_pretrained_folder,
    tower_layers,
)
from workers.pruning.patterns import parse_pattern
from workers.pruning.sequential import prune_towers
from workers.pruning.spec import JobCancelled, JobError, Progress, PruneSpec, Result
from workers.pruning.zero_shot import digits_zero_shot_accuracy

CALIBRATION_BATCH = 4  # windows per forward pass while pruning; the captured activations dominate memory
EVALUATION_BATCH = 4
ACCURACY_DATASET = "builtin:digits (held-out split, zero-shot over its ten digit prompts)"

_MESSAGES = {
    "loading": "Loading the model.",
    "calibration": "Preparing calibration and evaluation data.",
    "evaluation_dense": "Measuring the {} of the dense model.",
    "pruning": "Pruning block by block.",
    "evaluation_pruned": "Measuring the {} of the pruned model.",
    "saving": "Saving the pruned model.",
}


def _ignore(_progress: Progress) -> None:
    return None


def _never() -> bool:
    return False


def run(spec: PruneSpec, output_dir: Path, on_progress: Callable[[Progress], None] = _ignore,
        should_cancel: Callable[[], bool] = _never, checkpoint: Checkpoint | None = None) -> Result:
    """With a checkpoint, progress is saved after pruned blocks, and a run that finds the saved progress of
    the same job (spec, model and data contents, device, versions) resumes from it, to the same result."""
    method = get_method(spec.method)
    _check(spec)
    _check_targets(spec)
    device = resolve_device(spec.device)
    memory = _PeakMemory(device)
    timings: dict[str, float] = {}

    @contextmanager
    def stage(name: str, total: int = 1, what: str = "") -> Iterator[None]:
        if should_cancel():
            raise JobCancelled(f"cancelled before {name}")
        on_progress(Progress(name, 0, total, _MESSAGES[name].format(what)))
        start = time.perf_counter()
        yield
        timings[name] = round(time.perf_counter() - start, 3)

    with stage("loading"):
        loaded = load_model(Path(spec.model_dir), device, offload=spec.offload)
        model = loaded.model
        towers = find_towers(model)
        plan = plan_towers(towers, spec.sparsity, spec.targets)
        num_blocks = sum(len(tower.blocks) for tower, _ in plan)
        requested = spec.calibration.dataset
        cal_spec = replace(spec.calibration, dataset=multimodal.calibration_dataset(model, requested))
        resume: Resume | None = None
        if checkpoint is not None:
            resume = checkpoint.load(fingerprint(spec, device, next(model.parameters()).dtype))

    calibration = evaluation = None
    dataset_info: dict[str, Any] = {"dataset": cal_spec.dataset}
    if method.new_stats is not None or spec.evaluation.perplexity:
        with stage("calibration"):
            calibration, evaluation, dataset_info = multimodal.job_data(
                model, loaded.tokenizer, cal_spec, spec.evaluation, method.new_stats is not None,
                text_calibration=any(tower.name != "vision" for tower, _ in plan))
    if cal_spec.dataset != requested:
        dataset_info["dataset_requested"] = requested
        dataset_info["dataset_note"] = f"{requested} is the default; a CLIP model calibrates on {cal_spec.dataset}"
    text_lm = multimodal.perplexity_model(model)  # LLaVA: itself, text only; BLIP-2: its inner LM
    zero_shot = _zero_shot(spec, model, loaded.tokenizer, dataset_info)
    measured = " and ".join(name for name, on in (("perplexity", evaluation is not None),
                                                   ("zero-shot accuracy", zero_shot)) if on)

    ppl: dict[str, float | None] = {}
    accuracy: dict[str, float | None] = {}

    def evaluate(which: str) -> None:  # "dense" | "pruned"
        if evaluation is not None:
            ppl[which] = _finite(perplexity(text_lm, evaluation, EVALUATION_BATCH, should_cancel))
        if zero_shot:
            accuracy[which] = _finite(digits_zero_shot_accuracy(model, loaded.tokenizer, should_cancel=should_cancel))

    if resume is not None:  # the model is no longer dense: its metrics were saved with the checkpoint
        ppl.update(resume.extra.get("perplexity", {}))
        accuracy.update(resume.extra.get("accuracy", {}))
    elif measured:
        with stage("evaluation_dense", what=measured):
            evaluate("dense")
    if checkpoint is not None:
        checkpoint.extra = {"perplexity": ppl, "accuracy": accuracy}

    with stage("pruning", total=num_blocks):
        def block_done(done: int, total: int) -> None:
            on_progress(Progress("pruning", done, total, f"Pruned block {done} of {total}."))

        # Offloading: the model stays on the CPU and each block visits the device in turn.
        unused = prune_towers(model, plan, method, spec.pattern, calibration, CALIBRATION_BATCH,
                              on_block=block_done, should_cancel=should_cancel,
                              device=device if spec.offload else None, resume=resume,
                              after_block=checkpoint.after_block if checkpoint is not None else None)

    if measured:
        with stage("evaluation_pruned", what=measured):
            evaluate("pruned")

    # Reported sparsity covers the layers pruned; layers calibration never reached were left dense.
    layer_names = [name for tower, _ in plan for name in tower_layers(tower) if name not in unused]
    sparsity = sparsity_report(model, layer_names)
    with stage("saving"):
        save_pretrained_folder(model, loaded.tokenizer, output_dir,
                               source=loaded.path if loaded.source == "hf" else None)

    metrics: dict[str, Any] = {
        "sparsity": {"target": _overall_target(plan, sparsity["layers"]), "achieved": round(sparsity["achieved"], 6),
                     "per_layer": {name: round(value, 6) for name, value in sparsity["per_layer"].items()},
                     "per_tower": _per_tower(model, towers, unused),
                     "targets": {tower.name: value for tower, value in plan}},
        **({"perplexity": ppl} if ppl else {}),
        **({"accuracy": accuracy} if accuracy else {}),
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
        "model": {"source": loaded.source, "family": multimodal.family(model), "num_blocks": num_blocks,
                  "dtype": str(next(model.parameters()).dtype),
                  "towers": [{"name": t.name, "module": t.prefix, "num_blocks": len(t.blocks),
                              "pruned": any(t is planned for planned, _ in plan)} for t in towers]},
        "unused_layers": unused,
        "data": dataset_info,
        "environment": _environment(device, memory),
        **({"checkpoint": checkpoint.summary()} if checkpoint is not None else {}),
    }
    return Result(output_dir=output_dir, metrics=metrics, report=report)


def _zero_shot(spec: PruneSpec, model: torch.nn.Module, tokenizer: Any, info: dict[str, Any]) -> bool:
    """Whether this job measures zero-shot accuracy; why not goes into the report when it was asked for."""
    if not (spec.evaluation.accuracy and multimodal.measures_accuracy(model)):
        return False
    if tokenizer is None:
        info["accuracy_skipped"] = "the model folder has no tokenizer to encode the digit prompts"
        return False
    info["accuracy_dataset"] = ACCURACY_DATASET
    return True


def _check_targets(spec: PruneSpec) -> None:
    """What can be checked before loading; which towers the model has is checked once it is loaded."""
    for name, value in (spec.targets or {}).items():
        if name not in TOWERS:
            raise JobError("invalid_spec", f"targets has an unknown tower {name!r}; towers: {', '.join(TOWERS)}.")
        if not 0.0 < value < 1.0:
            raise JobError("invalid_spec", f"targets[{name!r}] must be between 0 and 1 (exclusive); got {value}.")
        nm = parse_pattern(spec.pattern)  # _check has already refused unknown patterns
        if nm is not None and not math.isclose(value, 1 - nm[0] / nm[1], abs_tol=1e-9):
            raise JobError("invalid_spec", f"Pattern {spec.pattern} fixes sparsity at {1 - nm[0] / nm[1]:g}; "
                                           f"got targets[{name!r}] = {value}.")


def _overall_target(plan: list[tuple[Tower, float]], layers: list[dict[str, Any]]) -> float:
    """The towers' targets weighted by their pruned weights: what `achieved` is measured against."""
    target_of = {layer: value for tower, value in plan for layer in tower_layers(tower)}
    numel = sum(layer["numel"] for layer in layers)
    if not numel:
        return plan[0][1] if plan else 0.0
    return round(sum(target_of[layer["name"]] * layer["numel"] for layer in layers) / numel, 6)


def _per_tower(model: torch.nn.Module, towers: list[Tower], unused: list[str]) -> dict[str, float]:
    """Achieved sparsity of every tower, pruned or not (an untargeted tower shows 0.0: it stayed dense)."""
    return {tower.name: round(sparsity_report(model, [n for n in tower_layers(tower) if n not in unused])
                              ["achieved"], 6) for tower in towers}


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
    try:
        nm = parse_pattern(spec.pattern)
    except ValueError:
        raise JobError("unsupported_pattern", f"Pattern {spec.pattern!r} is not available; use 'unstructured' "
                                              "or N:M such as '2:4' or '4:8'.") from None
    # An N:M pattern prunes exactly m - n of every m weights: a different target could never be met.
    if nm is not None and not math.isclose(spec.sparsity, 1 - nm[0] / nm[1], abs_tol=1e-9):
        raise JobError("invalid_spec", f"Pattern {spec.pattern} fixes sparsity at {1 - nm[0] / nm[1]:g}; "
                                       f"got {spec.sparsity}.")


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
