"""One pruning job as one function: load, tokenize, evaluate, prune block by block, evaluate, save."""

from __future__ import annotations

import contextlib
import hashlib
import json
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

from workers.pruning import multimodal, restore
from workers.pruning.allocation import plan as allocation_plan
from workers.pruning.allocation.plan import ScoreCache
from workers.pruning.checkpoint import Checkpoint, Resume, digest_path, fingerprint
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
from workers.pruning.sequential import ModelInputs, as_inputs, prune_towers
from workers.pruning.spec import (
    ALLOCATIONS,
    GRANULARITIES,
    CalibrationSpec,
    JobCancelled,
    JobError,
    Progress,
    PruneSpec,
    Result,
)
from workers.pruning.zero_shot import digits_zero_shot_accuracy

CALIBRATION_BATCH = 4  # windows per forward pass while pruning; the captured activations dominate memory
EVALUATION_BATCH = 4
ACCURACY_DATASET = "builtin:digits (held-out split, zero-shot over its ten digit prompts)"

_MESSAGES = {
    "loading": "Loading the model.",
    "calibration": "Preparing calibration and evaluation data.",
    "evaluation_dense": "Measuring the {} of the dense model.",
    "scoring": "Scoring the importance of every layer ({}).",
    "pruning": "Pruning block by block{}.",
    "restoring": "Restoring the pruned model with {}.",
    "evaluation_pruned": "Measuring the {} of the pruned model.",
    "saving": "Saving the pruned model.",
}


def _ignore(_progress: Progress) -> None:
    return None


def _never() -> bool:
    return False


def run(spec: PruneSpec, output_dir: Path, on_progress: Callable[[Progress], None] = _ignore,
        should_cancel: Callable[[], bool] = _never, checkpoint: Checkpoint | None = None,
        score_cache: ScoreCache | None = None) -> Result:
    """With a checkpoint, progress is saved after pruned blocks, and a run that finds the saved progress of
    the same job (spec, model and data contents, device, versions) resumes from it, to the same result.

    A sweep (spec.sweep) prunes one model per sparsity into output_dir/sparsity-<s>/, from one calibration,
    one dense evaluation and one scoring pass; it is not checkpointed. With a score cache, an allocation's
    scores are looked up by (model digest, dataset, options) before scoring, and stored after."""
    method = get_method(spec.method)
    _check(spec)
    _check_targets(spec)
    _check_allocation(spec)
    if spec.restore is not None:
        restore.check(spec.restore, spec.offload)
    device = resolve_device(spec.device)
    memory = _PeakMemory(device)
    timings: dict[str, float] = {}
    sweep = tuple(spec.sweep)
    if sweep:
        checkpoint = None

    @contextmanager
    def stage(name: str, total: int = 1, what: str = "") -> Iterator[None]:
        if should_cancel():
            raise JobCancelled(f"cancelled before {name}")
        on_progress(Progress(name, 0, total, _MESSAGES[name].format(what)))
        start = time.perf_counter()
        yield
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 3)

    first_sparsity = sweep[0] if sweep else spec.sparsity
    with stage("loading"):
        loaded = load_model(Path(spec.model_dir), device, offload=spec.offload)
        model = loaded.model
        towers = find_towers(model)
        plan = plan_towers(towers, first_sparsity, spec.targets)
        num_blocks = sum(len(tower.blocks) for tower, _ in plan)
        requested = spec.calibration.dataset
        cal_spec = replace(spec.calibration, dataset=multimodal.calibration_dataset(model, requested))
        if spec.restore is not None:
            restore.check_model(model, loaded.tokenizer, spec.restore, cal_spec,
                                [name for tower, _ in plan for name in tower_layers(tower)])
        resume: Resume | None = None
        if checkpoint is not None:
            resume = checkpoint.load(fingerprint(spec, device, next(model.parameters()).dtype))

    scored = allocation_plan.needs_scores(spec.allocation)
    calibrate = method.new_stats is not None or scored
    calibration = evaluation = None
    dataset_info: dict[str, Any] = {"dataset": cal_spec.dataset}
    if calibrate or spec.evaluation.perplexity:
        with stage("calibration"):
            calibration, evaluation, dataset_info = multimodal.job_data(
                model, loaded.tokenizer, cal_spec, spec.evaluation, calibrate,
                text_calibration=any(tower.name != "vision" for tower, _ in plan))
    if cal_spec.dataset != requested:
        dataset_info["dataset_requested"] = requested
        dataset_info["dataset_note"] = f"{requested} is the default; a CLIP model calibrates on {cal_spec.dataset}"
    zero_shot = _zero_shot(spec, model, loaded.tokenizer, dataset_info)
    measured = " and ".join(name for name, on in (("perplexity", evaluation is not None),
                                                   ("zero-shot accuracy", zero_shot)) if on)

    def evaluate(into: dict[str, dict[str, float | None]], which: str) -> None:  # "dense" | "pruned"
        current = loaded.model
        lm = multimodal.perplexity_model(current)  # LLaVA: itself, text only; BLIP-2: its inner LM
        if evaluation is not None and lm is not None:
            into.setdefault("perplexity", {})[which] = _finite(perplexity(lm, evaluation, EVALUATION_BATCH,
                                                                          should_cancel))
        if zero_shot:
            into.setdefault("accuracy", {})[which] = _finite(
                digits_zero_shot_accuracy(current, loaded.tokenizer, should_cancel=should_cancel))

    dense: dict[str, dict[str, float | None]] = {}
    if resume is not None:  # the model is no longer dense: its metrics were saved with the checkpoint
        for key in ("perplexity", "accuracy"):
            if resume.extra.get(key):
                dense[key] = dict(resume.extra[key])
    elif measured:
        with stage("evaluation_dense", what=measured):
            evaluate(dense, "dense")
    if checkpoint is not None:
        checkpoint.extra = {"perplexity": dense.get("perplexity", {}), "accuracy": dense.get("accuracy", {})}

    raw: dict[str, Any] | None = None
    scoring_info: dict[str, Any] = {}
    if scored:
        assert calibration is not None
        with stage("scoring", total=1, what=spec.allocation.name):
            raw, scoring_info = _scores(spec, model, plan, as_inputs(calibration), device, score_cache,
                                        should_cancel, on_progress)

    # The teacher of restoration: the dense weights of every layer that may be pruned, copied before pruning
    # (a resumed run restores its pruned blocks inside prune_towers, so the model is still dense here).
    dense_weights = None
    if spec.restore is not None and spec.restore.distill > 0:
        dense_weights = restore.dense_copies({name: layer for tower, _ in plan
                                              for name, layer in tower_layers(tower).items()})

    runs = []
    for number, target in enumerate(sweep or (spec.sparsity,)):
        if number > 0:  # every sparsity of a sweep starts from the dense weights
            del model, towers
            loaded.model = None  # the pruned copy is saved: only one model in memory at a time
            with stage("loading"):
                loaded = load_model(Path(spec.model_dir), device, offload=spec.offload)
                model = loaded.model
                towers = find_towers(model)
        plan = plan_towers(towers, target, spec.targets)
        allocation = None
        if raw is not None:
            joint = target if spec.targets is None else None
            allocation = allocation_plan.allocate(plan, spec.allocation, raw, joint)
        label = f" at sparsity {target:g}" if sweep else ""
        with stage("pruning", total=num_blocks, what=label):
            def block_done(done: int, total: int, label: str = label) -> None:
                on_progress(Progress("pruning", done, total, f"Pruned block {done} of {total}{label}."))

            # Offloading: the model stays on the CPU and each block visits the device in turn.
            unused = prune_towers(model, plan, method, spec.pattern, calibration, CALIBRATION_BATCH,
                                  on_block=block_done, should_cancel=should_cancel,
                                  device=device if spec.offload else None, resume=resume,
                                  after_block=checkpoint.after_block if checkpoint is not None else None,
                                  layer_sparsity=allocation.layer_sparsity if allocation is not None else None)
        # Reported sparsity covers the layers pruned; layers calibration never reached were left dense.
        layer_names = [name for tower, _ in plan for name in tower_layers(tower) if name not in unused]
        restored = None
        if spec.restore is not None:
            restored = _restore(spec, model, loaded.tokenizer, layer_names, cal_spec, dense_weights, label,
                                measured, evaluate, stage, on_progress, should_cancel)
        pruned: dict[str, dict[str, float | None]] = {}
        if measured:
            with stage("evaluation_pruned", what=measured):
                evaluate(pruned, "pruned")
        sparsity = sparsity_report(model, layer_names)
        if restored is not None:
            restored["sparsity_after_merge"] = round(sparsity["achieved"], 6)
        folder = output_dir / f"sparsity-{target:g}" if sweep else output_dir
        with stage("saving"):
            save_pretrained_folder(model, loaded.tokenizer, folder,
                                   source=loaded.path if loaded.source == "hf" else None)
        runs.append({"target": target, "plan": plan, "unused": unused, "sparsity": sparsity,
                     "allocation": allocation, "pruned": pruned, "folder": folder, "restore": restored,
                     "per_tower": _per_tower(model, towers, unused)})

    # The job's own sparsity (the API makes it one of a sweep's) is the run the top-level metrics describe.
    first = next((run for run in runs if math.isclose(run["target"], spec.sparsity, abs_tol=1e-9)), runs[0])
    sparsity = first["sparsity"]
    quality = {key: {**dense.get(key, {}), **first["pruned"].get(key, {})}
               for key in ("perplexity", "accuracy") if key in dense or key in first["pruned"]}
    metrics: dict[str, Any] = {
        "sparsity": {"target": _overall_target(first["plan"], sparsity["layers"]),
                     "achieved": round(sparsity["achieved"], 6),
                     "per_layer": {name: round(value, 6) for name, value in sparsity["per_layer"].items()},
                     "per_tower": first["per_tower"],
                     "targets": {tower.name: value for tower, value in first["plan"]}},
        **quality,
        "timings_s": timings,
        "peak_memory_mb": memory.peak_mb(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_pruned_parameters": sparsity["num_zeros"],
    }
    if raw is not None:
        metrics["allocation"] = {"name": spec.allocation.name, "granularity": spec.allocation.granularity,
                                 **scoring_info, "per_tower": first["allocation"].per_tower}
    if first["restore"] is not None:
        metrics["restore"] = {key: value for key, value in first["restore"].items() if key != "data"}
    if sweep:
        metrics["sweep"] = [_sweep_row(run, dense, output_dir) for run in runs]
    report = {
        **metrics,
        "layers": sparsity["layers"],
        "num_prunable_parameters": sparsity["num_prunable_parameters"],
        "spec": _plain(asdict(spec)),
        "model": {"source": loaded.source, "family": multimodal.family(model), "num_blocks": num_blocks,
                  "dtype": str(next(model.parameters()).dtype),
                  "towers": [{"name": t.name, "module": t.prefix, "num_blocks": len(t.blocks),
                              "pruned": any(t is planned for planned, _ in first["plan"])} for t in towers]},
        "unused_layers": first["unused"],
        "data": dataset_info if first["restore"] is None else {**dataset_info, "restore": first["restore"]["data"]},
        "environment": _environment(device, memory),
        **({"checkpoint": checkpoint.summary()} if checkpoint is not None else {}),
    }
    if raw is not None:
        report["allocation"] = {**metrics["allocation"], "groups": first["allocation"].groups}
        if sweep:
            report["allocation"]["groups_per_sparsity"] = {
                f"{run['target']:g}": run["allocation"].groups for run in runs}
    return Result(output_dir=output_dir, metrics=metrics, report=report)


def _sweep_row(run: dict[str, Any], dense: dict[str, dict[str, float | None]], output_dir: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"sparsity": run["target"], "achieved": round(run["sparsity"]["achieved"], 6),
                           "per_tower": run["per_tower"], "folder": run["folder"].relative_to(output_dir).as_posix()}
    for key in ("perplexity", "accuracy"):
        if key in run["pruned"]:
            row[key] = run["pruned"][key].get("pruned")
            row[f"dense_{key}"] = dense.get(key, {}).get("dense")
    if run["allocation"] is not None:
        row["allocation_per_tower"] = run["allocation"].per_tower
    if run["restore"] is not None:
        row["restore"] = {key: run["restore"][key] for key in _SWEEP_RESTORE_KEYS if key in run["restore"]}
    return row


_SWEEP_RESTORE_KEYS = ("loss_first", "loss_last", "mask_preserved", "sparsity_before_merge", "sparsity_after_merge",
                       "perplexity_before", "accuracy_before", "seconds", "cpu_seconds")


def _restore(spec: PruneSpec, model: torch.nn.Module, tokenizer: Any, layer_names: list[str],
             cal_spec: CalibrationSpec, dense_weights: dict[str, torch.Tensor] | None, label: str, measured: str,
             evaluate: Callable[[dict[str, dict[str, float | None]], str], None],
             stage: Callable[..., contextlib.AbstractContextManager[None]],
             on_progress: Callable[[Progress], None], should_cancel: Callable[[], bool]) -> dict[str, Any]:
    """The restoring stage: the pruned model's quality first (when the job measures it), then fine-tuning."""
    assert spec.restore is not None
    name = "SparseLoRA" if spec.restore.method == "sparse-lora" else "plain LoRA"
    with stage("restoring", total=spec.restore.steps, what=f"{name} ({spec.restore.steps} steps){label}"):
        before: dict[str, dict[str, float | None]] = {}
        if measured:
            on_progress(Progress("restoring", 0, spec.restore.steps,
                                 f"Measuring the {measured} of the pruned model before restoration{label}."))
            evaluate(before, "pruned")
        sparsity_before = sparsity_report(model, layer_names)["achieved"]
        modules = dict(model.named_modules())
        restored = restore.restore_pruned(model, tokenizer, {n: modules[n] for n in layer_names}, spec.restore,
                                          cal_spec, dense_weights, on_progress, should_cancel, label)
    restored["sparsity_before_merge"] = round(sparsity_before, 6)
    for key in ("perplexity", "accuracy"):
        if key in before:
            restored[f"{key}_before"] = before[key]["pruned"]
    return restored


def _scores(spec: PruneSpec, model: torch.nn.Module, plan: list[tuple[Tower, float]], calibration: ModelInputs,
            device: torch.device, cache: ScoreCache | None, should_cancel: Callable[[], bool],
            on_progress: Callable[[Progress], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The allocation's raw scores, from the cache when an earlier job computed them with the same options."""
    options = allocation_plan.cache_options(spec.allocation, spec.calibration.seed)
    key = None
    if cache is not None:
        dataset = Path(spec.calibration.dataset)
        identity = {"model": digest_path(Path(spec.model_dir)),
                    "dataset": digest_path(dataset) if dataset.exists() else spec.calibration.dataset,
                    "calibration": {"num_samples": spec.calibration.num_samples, "seq_len": spec.calibration.seq_len},
                    "towers": [tower.prefix for tower, _ in plan], "options": options, "device": device.type,
                    "dtype": str(next(model.parameters()).dtype), "torch": torch.__version__, "version": 1}
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        cached = cache.get(key)
        if cached is not None:
            on_progress(Progress("scoring", 1, 1, f"Used cached {spec.allocation.name} scores (key {key[:12]}); "
                                                  "no scoring pass was needed."))
            return cached, {"cache": "hit", "cache_key": key, "scoring_s": 0.0, "options": options,
                            "cached_scoring_s": cached.get("scoring_s")}
    inputs = allocation_plan.score_inputs(model, calibration, spec.allocation)
    start = time.perf_counter()

    def step(done: int, total: int) -> None:
        if done == total or done % 10 == 0:
            on_progress(Progress("scoring", done, total, f"Scored {done} of {total}."))

    raw = allocation_plan.raw_scores(model, [tower for tower, _ in plan], inputs, spec.allocation,
                                     spec.calibration.seed, should_cancel, step)
    seconds = round(time.perf_counter() - start, 3)
    raw["scoring_s"] = seconds  # kept with the scores: a later job that reuses them can say what they cost
    info: dict[str, Any] = {"cache": "miss" if cache is not None else None, "scoring_s": seconds, "options": options}
    if cache is not None and key is not None:
        cache.put(key, raw)
        info["cache_key"] = key
        on_progress(Progress("scoring", 1, 1, f"Stored the {spec.allocation.name} scores in the score cache "
                                              f"(key {key[:12]})."))
    return raw, info


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


def _check_allocation(spec: PruneSpec) -> None:
    allocation = spec.allocation
    if allocation.name not in ALLOCATIONS:
        raise JobError("invalid_spec", f"Allocation {allocation.name!r} is not available; use one of "
                                       f"{', '.join(ALLOCATIONS)}.")
    if allocation.granularity not in GRANULARITIES:
        raise JobError("invalid_spec", f"allocation_options.granularity must be 'block' or 'layer'; got "
                                       f"{allocation.granularity!r}.")
    if allocation.name != "uniform" and parse_pattern(spec.pattern) is not None:
        raise JobError("invalid_spec", f"Pattern {spec.pattern} fixes every layer's sparsity, so allocation "
                                       f"{allocation.name!r} has nothing to decide; use allocation 'uniform'.")
    if allocation.num_samples < 1 or (allocation.seq_len is not None and allocation.seq_len < 2):
        raise JobError("invalid_spec", "allocation_options.num_samples must be >= 1 and seq_len >= 2.")
    if not allocation.eps > 0:
        raise JobError("invalid_spec", f"allocation_options.eps must be positive; got {allocation.eps}.")
    for value in spec.sweep:
        if not 0.0 < value < 1.0:
            raise JobError("invalid_spec", f"Sweep sparsities must be between 0 and 1 (exclusive); got {value}.")
    lowest = min(spec.sweep or (spec.sparsity,))
    if allocation.max_sparsity is not None and not lowest <= allocation.max_sparsity < 1.0:
        raise JobError("invalid_spec", f"allocation_options.max_sparsity must be at least the target sparsity "
                                       f"({lowest}) and below 1; got {allocation.max_sparsity}.")
    if spec.sweep and spec.targets is not None:
        raise JobError("invalid_spec", "A sweep varies one sparsity for every tower; it cannot be combined "
                                       "with per-tower targets.")
    if spec.sweep and parse_pattern(spec.pattern) is not None:
        raise JobError("invalid_spec", f"Pattern {spec.pattern} fixes the sparsity; a sweep has nothing to vary.")


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
