"""One pruning job as one function: load, tokenize, evaluate, prune block by block, evaluate, save.

`run` reads as its stages; each stage is a function below it, in the order the job runs them.
"""

from __future__ import annotations

import contextlib
import math
import platform
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from prunekit.vocabulary import OFFLOAD_CPU, OFFLOAD_DISK, same_sparsity
from workers.pruning import budget_search, multimodal, restore
from workers.pruning.allocation import plan as allocation_plan
from workers.pruning.allocation.cache import ScoreCache, Scores, cached_scores
from workers.pruning.allocation.plan import LayerSparsities
from workers.pruning.allocation.streamed_scoring import Stream
from workers.pruning.checkpoint import Checkpoint, Resume, fingerprint
from workers.pruning.checks import check_spec
from workers.pruning.evaluate import perplexity, sparsity_report
from workers.pruning.methods import Method, get_method
from workers.pruning.models import (
    LoadedModel,
    Tower,
    checkpoint_names,
    find_towers,
    load_model,
    plan_towers,
    resolve_device,
    save_like_source,
    save_pretrained_folder,
    tower_layers,
)
from workers.pruning.multimodal import ModelAdapter, adapt
from workers.pruning.sequential import BlockHome, ModelInputs, as_inputs, prune_towers
from workers.pruning.spec import CalibrationSpec, JobCancelled, JobError, Progress, PruneSpec, Result, spec_record
from workers.pruning.streaming import DiskHome, MemoryChoice, StreamedModel, choose_memory
from workers.pruning.streaming_eval import streamed_perplexity
from workers.pruning.task_accuracy import Task, load_task, score_tasks, task_info
from workers.pruning.weights_io import WeightFiles
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
    "budget_search": "{}",
}
_QUALITY = ("perplexity", "accuracy")

# Quality measured so far, by metric then model: {"perplexity": {"dense": 12.3, "pruned": 14.1}}; task accuracy
# as {"tasks": {"dense": {task name: {"acc": ..., "acc_norm": ..., ...}}}}.
Quality = dict[str, dict[str, Any]]
Plan = list[tuple[Tower, float]]


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
    check_spec(spec)
    if spec.restore is not None:
        restore.check(spec.restore, spec.offload)
    device = resolve_device(spec.device)
    job = _Job(spec, output_dir, device, _PeakMemory(device), on_progress, should_cancel,
               None if spec.sweep or spec.budget is not None else checkpoint, choose_memory(spec, device))
    setup = _load(job)
    data = _prepare_data(job, method, setup)
    dense = _dense_quality(job, setup, data)
    scores = _score(job, setup, data, score_cache)
    dense_weights = _dense_weights(spec, setup.plan)
    if spec.budget is not None:  # a quality budget: the sparsity is searched for (budget_search.py)
        return _budget_job(job, setup, method, data, dense, scores, dense_weights)
    runs: list[PrunedRun] = []
    for number, target in enumerate(job.targets):
        if number > 0:  # every sparsity of a sweep starts from the dense weights
            _reload(job, setup)
        runs.append(_prune_one(job, setup, method, data, scores, dense_weights, target))
    return _result(job, setup, data, dense, scores, runs)


# --- what the stages share and hand on -------------------------------------------------------------------


@dataclass
class _Job:
    """One run's fixed inputs, its callbacks, and the time each stage took."""

    spec: PruneSpec
    output_dir: Path
    device: torch.device
    memory: _PeakMemory
    on_progress: Callable[[Progress], None]
    should_cancel: Callable[[], bool]
    checkpoint: Checkpoint | None  # None for a sweep or a budget job: they are not checkpointed
    placement: MemoryChoice  # in memory, in CPU memory, or streamed from disk, and who chose it
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def streams(self) -> bool:
        return self.placement.mode == OFFLOAD_DISK

    @property
    def targets(self) -> tuple[float, ...]:
        """The sparsities pruned: a sweep's, or the job's one."""
        return tuple(self.spec.sweep) or (self.spec.sparsity,)

    @contextmanager
    def stage(self, name: str, total: int = 1, what: str = "", done: int = 0) -> Iterator[None]:
        """A stage: a cancellation point, a progress event as it starts, and its time (summed over a sweep)."""
        if self.should_cancel():
            raise JobCancelled(f"cancelled before {name}")
        self.on_progress(Progress(name, done, total, _MESSAGES[name].format(what)))
        start = time.perf_counter()
        yield
        self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 3)


@dataclass
class _Model:
    """The model in memory (a sweep loads it again for every sparsity), its family resolved once. A streamed
    model's module tree has its weights on `meta`: `streamed` reads them from the files when needed."""

    loaded: LoadedModel
    adapter: ModelAdapter
    towers: list[Tower]
    streamed: StreamedModel | None = None
    # full layer name -> the dtype its weight is saved in, where narrower than the one it computes in
    storage_dtypes: dict[str, torch.dtype] = field(default_factory=dict)

    @property
    def module(self) -> torch.nn.Module:
        return self.adapter.model

    def running(self, part: torch.nn.Module | None = None) -> contextlib.AbstractContextManager[None]:
        """While the model (or `part` of it, BLIP-2's language model) runs (accuracy, tasks): a streamed model
        reads its modules as they are called."""
        if self.streamed is None:
            return contextlib.nullcontext()
        return self.streamed.forward(parts=() if part is None else (part,))


@dataclass
class _Setup:
    """What loading decided: the model, the first plan, the calibration as resolved, where to resume."""

    model: _Model
    plan: Plan
    num_blocks: int
    calibration: CalibrationSpec  # the job's, with the dataset this model calibrates on
    resume: Resume | None


@dataclass
class _Data:
    calibration: ModelInputs | None  # None when neither the method nor the allocation needs activations
    evaluation: torch.Tensor | None  # perplexity windows; None when not measured
    info: dict[str, Any]  # report["data"]
    zero_shot: bool  # whether zero-shot accuracy is measured
    measured: str  # what is measured, for messages ("perplexity and zero-shot accuracy"); "" for nothing
    tasks: tuple[Task, ...] = ()  # multiple-choice tasks scored dense and pruned


@dataclass
class PrunedRun:
    """One pruned model: the job's, or one sparsity of a sweep."""

    target: float
    plan: Plan
    unused: list[str]  # layers calibration never reached, left dense
    sparsity: dict[str, Any]  # evaluate.sparsity_report of the pruned layers
    allocation: LayerSparsities | None
    pruned: Quality
    folder: Path
    restore: dict[str, Any] | None  # metrics["restore"] plus the data it trained on
    per_tower: dict[str, float]


# --- the stages, in order --------------------------------------------------------------------------------


def _load(job: _Job) -> _Setup:
    spec = job.spec
    with job.stage("loading"):
        if job.placement.chosen_by == "worker":
            job.on_progress(Progress("loading", 0, 1, job.placement.message()))
        model = _load_model(job)
        plan = plan_towers(model.towers, job.targets[0], spec.targets)
        requested = spec.calibration.dataset
        calibration = replace(spec.calibration, dataset=multimodal.calibration_dataset(model.adapter, requested))
        if spec.restore is not None:
            restore.check_model(model.adapter, model.loaded.tokenizer, spec.restore, calibration,
                                [name for tower, _ in plan for name in tower_layers(tower)])
        resume: Resume | None = None
        if job.checkpoint is not None:
            # The mode the job runs in, not the one it asked for: a streamed run's checkpoint holds its blocks in
            # the input's dtype, read back from its output.
            resume = job.checkpoint.load(fingerprint(replace(spec, offload=job.placement.mode), job.device,
                                                     next(model.module.parameters()).dtype))
            job.checkpoint.output = model.streamed  # a streamed run's checkpoint points at its output's shards
    return _Setup(model, plan, sum(len(tower.blocks) for tower, _ in plan), calibration, resume)


def _load_model(job: _Job) -> _Model:
    if job.streams:
        streamed = StreamedModel(Path(job.spec.model_dir), job.device)
        loaded = streamed.loaded_model()
        towers = find_towers(loaded.model)
        return _Model(loaded, adapt(loaded.model), towers, streamed,
                      _storage_dtypes(towers, streamed.files, streamed.tensor_name))
    loaded = load_model(Path(job.spec.model_dir), job.device, offload=job.placement.mode)
    towers = find_towers(loaded.model)
    storage: dict[str, torch.dtype] = {}
    if loaded.source == "hf":
        with WeightFiles(loaded.path) as files, contextlib.suppress(JobError):  # JobError: files it converts
            stored_as = {target: tensor for tensor, target in checkpoint_names(loaded.model, files.names()).items()}
            storage = _storage_dtypes(towers, files, stored_as.__getitem__)
    return _Model(loaded, adapt(loaded.model), towers, None, storage)


def _storage_dtypes(towers: list[Tower], files: WeightFiles, tensor_of: Callable[[str], str]) -> dict[str, torch.dtype]:
    """Every prunable layer whose weight the files store narrower than it computes (bf16 pruned in fp32 on a
    CPU): the pruned weights are rounded to it before they feed the next block (sequential.Pruning)."""
    narrower: dict[str, torch.dtype] = {}
    for tower in towers:
        for name, layer in tower_layers(tower).items():
            try:
                stored = files.info(tensor_of(f"{name}.weight")).dtype
            except KeyError:
                continue
            if stored.is_floating_point and stored.itemsize < layer.weight.dtype.itemsize:
                narrower[name] = stored
    return narrower


def _reload(job: _Job, setup: _Setup) -> None:
    """The dense model again, for the next sparsity of a sweep; the pruned copy is saved already."""
    del setup.model  # the pruned copy is saved: let it go before the dense one is loaded
    with job.stage("loading"):
        setup.model = _load_model(job)


def _prepare_data(job: _Job, method: Method, setup: _Setup) -> _Data:
    spec, model = job.spec, setup.model
    # needs_data: alphapruning's scores come from the weights alone
    calibrate = method.new_stats is not None or allocation_plan.needs_data(spec.allocation)
    calibration = evaluation = None
    info: dict[str, Any] = {"dataset": setup.calibration.dataset}
    tasks = _tasks(job, model)  # first: a task the model cannot score is refused before any data is made
    if calibrate or spec.evaluation.perplexity:
        with job.stage("calibration"):
            calibration, evaluation, info = multimodal.job_data(
                model.adapter, model.loaded.tokenizer, setup.calibration, spec.evaluation, calibrate,
                text_calibration=any(tower.name != "vision" for tower, _ in setup.plan))
    requested = spec.calibration.dataset
    if setup.calibration.dataset != requested:
        info["dataset_requested"] = requested
        info["dataset_note"] = f"{requested} is the default; a CLIP model calibrates on {setup.calibration.dataset}"
    if tasks:
        info["tasks"] = {task.name: task_info(task) for task in tasks}
    zero_shot = _zero_shot(spec, model.adapter, model.loaded.tokenizer, info)
    measured = " and ".join(name for name, on in (("perplexity", evaluation is not None),
                                                   ("zero-shot accuracy", zero_shot), ("task accuracy", bool(tasks)))
                            if on)
    return _Data(calibration, evaluation, info, zero_shot, measured, tasks)


def _tasks(job: _Job, model: _Model) -> tuple[Task, ...]:
    """the job's multiple-choice tasks, loaded (an uploaded file from where the worker fetched it);
    refused for a model without a causal LM to score them (CLIP) or without a tokenizer."""
    evaluation = job.spec.evaluation
    if not evaluation.tasks:
        return ()
    if multimodal.perplexity_model(model.adapter) is None or model.loaded.tokenizer is None:
        what = "has no tokenizer" if model.loaded.tokenizer is None else "is not a language model (CLIP)"
        raise JobError("invalid_spec", f"evaluation.tasks: the model {what}; multiple-choice tasks are scored by a "
                                       "language model's log-likelihood.")
    return tuple(load_task(name, evaluation.task_num_samples, evaluation.task_files.get(name))
                 for name in evaluation.tasks)


def _zero_shot(spec: PruneSpec, model: ModelAdapter, tokenizer: Any, info: dict[str, Any]) -> bool:
    """Whether this job measures zero-shot accuracy; why not goes into the report when it was asked for."""
    if not (spec.evaluation.accuracy and multimodal.measures_accuracy(model)):
        return False
    if tokenizer is None:
        info["accuracy_skipped"] = "the model folder has no tokenizer to encode the digit prompts"
        return False
    info["accuracy_dataset"] = ACCURACY_DATASET
    return True


def _measure(job: _Job, data: _Data, model: _Model, which: str) -> Quality:
    """The model's perplexity and zero-shot accuracy, as far as this job measures them, under `which`
    ("dense" | "pruned")."""
    quality: Quality = {}
    lm = multimodal.perplexity_model(model.adapter)  # LLaVA: itself, text only; BLIP-2: its inner LM
    if data.evaluation is not None and lm is not None:
        quality["perplexity"] = {which: _finite(_perplexity(job, model, lm, data.evaluation))}
    # Streamed, these run module by module (each block read as it is called): the same numbers, slower.
    if data.zero_shot:
        with model.running():
            quality["accuracy"] = {which: _finite(digits_zero_shot_accuracy(
                model.module, model.loaded.tokenizer, should_cancel=job.should_cancel))}
    if data.tasks and lm is not None:
        with model.running(lm):
            quality["tasks"] = {which: score_tasks(lm, model.loaded.tokenizer, data.tasks, job.should_cancel)}
    return quality


def _perplexity(job: _Job, model: _Model, lm: torch.nn.Module, windows: torch.Tensor) -> float:
    """In memory, or streamed block by block over all windows (the same number; each block read once). A
    streamed model reads the input until its output is complete, and the output (the pruned model) after."""
    if model.streamed is None:
        return perplexity(lm, windows, EVALUATION_BATCH, job.should_cancel)
    language = next(tower for tower in model.towers if tower.name == "language")
    blocks = [(f"{language.prefix}.{index}", block) for index, block in enumerate(language.blocks)]
    return streamed_perplexity(model.streamed, lm, blocks, windows, EVALUATION_BATCH, job.should_cancel)


def _dense_quality(job: _Job, setup: _Setup, data: _Data) -> Quality:
    """The dense model's quality; a resumed model is no longer dense, so its was saved with the checkpoint."""
    dense: Quality = {}
    if setup.resume is not None:
        for key in (*_QUALITY, "tasks"):
            if setup.resume.extra.get(key):
                dense[key] = dict(setup.resume.extra[key])
    elif data.measured:
        with job.stage("evaluation_dense", what=data.measured):
            dense = _measure(job, data, setup.model, "dense")
    if job.checkpoint is not None:
        job.checkpoint.extra = {"perplexity": dense.get("perplexity", {}), "accuracy": dense.get("accuracy", {}),
                                "tasks": dense.get("tasks", {})}
    return dense


def _score(job: _Job, setup: _Setup, data: _Data, cache: ScoreCache | None) -> Scores | None:
    """The allocation's raw scores on the dense model, once for every sparsity of a sweep; None: uniform."""
    if not allocation_plan.needs_scores(job.spec.allocation):
        return None
    assert data.calibration is not None or not allocation_plan.needs_data(job.spec.allocation)
    streamed = setup.model.streamed
    # Streamed: block by block, each block read a bounded number of times (streamed_scoring); the zeroth-order
    # branches alive at once held to a quarter of the worker's memory budget.
    stream = None if streamed is None else Stream(streamed, None if job.spec.memory_budget_mb is None
                                                  else job.spec.memory_budget_mb * 2**20 // 4)
    with job.stage("scoring", total=1, what=job.spec.allocation.name):
        return cached_scores(job.spec, setup.model.adapter, [tower for tower, _ in setup.plan],
                             as_inputs(data.calibration) if data.calibration is not None else None, job.device,
                             cache, job.should_cancel, job.on_progress, stream)


def _dense_weights(spec: PruneSpec, plan: Plan) -> dict[str, torch.Tensor] | None:
    """The teacher of restoration: the dense weights of every layer that may be pruned, copied before pruning
    (a resumed run restores its pruned blocks inside prune_towers, so the model is still dense here)."""
    if spec.restore is None or spec.restore.distill <= 0:
        return None
    return restore.dense_copies({name: layer for tower, _ in plan for name, layer in tower_layers(tower).items()})


def _prune_one(job: _Job, setup: _Setup, method: Method, data: _Data, scores: Scores | None,
               dense_weights: dict[str, torch.Tensor] | None, target: float,
               probed: _Probed | None = None) -> PrunedRun:
    """Prunes the model in memory to one target sparsity, restores it when asked, measures it and saves it.
    With `probed` (a budget job's last probe), the model is pruned to the target already and was measured so."""
    spec, model = job.spec, setup.model
    plan, allocation = _allocate(job, setup, scores, target)
    label = f" at sparsity {target:g}" if spec.sweep else ""
    folder = job.output_dir / f"sparsity-{target:g}" if spec.sweep else job.output_dir
    zeros: dict[str, int] | None = None  # a streamed model's zeros, counted as its blocks were written
    if probed is not None:
        unused = probed.unused
    elif model.streamed is not None:
        unused, zeros = _prune_streamed(job, setup, method, data, plan, allocation, label, folder)
    else:
        unused = _prune(job, setup, method, data, plan, allocation, label)
    # Reported sparsity covers the layers pruned; layers calibration never reached were left dense.
    layer_names = [name for tower, _ in plan for name in tower_layers(tower) if name not in unused]
    restored = None
    if spec.restore is not None:
        restored = _restore(job, setup, data, layer_names, dense_weights, label)
    pruned: Quality = {}
    if probed is not None and restored is None:
        pruned = probed.quality
    elif data.measured:
        with job.stage("evaluation_pruned", what=data.measured):
            pruned = _measure(job, data, model, "pruned")
    sparsity = sparsity_report(model.module, layer_names, zeros)
    if restored is not None:
        restored["sparsity_after_merge"] = round(sparsity["achieved"], 6)
    with job.stage("saving"):
        if model.streamed is None:  # a streamed model was written block by block while it was pruned
            _save(job, model, folder)
    return PrunedRun(target, plan, unused, sparsity, allocation, pruned, folder, restored,
                     _per_tower(model.module, model.towers, unused, zeros))


def _save(job: _Job, model: _Model, folder: Path) -> None:
    """An HF folder's model in its own layout: the same tensors in the input's dtype (bf16 in, bf16 out), sharded
    at the job's shard size, its config and tokenizer files copied; a GGUF model as transformers saves it."""
    if model.loaded.source == "hf":
        save_like_source(model.module, model.loaded.path, folder, job.spec.output_shard_bytes)
    else:
        save_pretrained_folder(model.module, model.loaded.tokenizer, folder)


def _allocate(job: _Job, setup: _Setup, scores: Scores | None, target: float) -> tuple[Plan, LayerSparsities | None]:
    """The towers' plan at one target sparsity, and the allocation's sparsity per layer from its scores."""
    spec = job.spec
    plan = plan_towers(setup.model.towers, target, spec.targets)
    if scores is None:
        return plan, None
    return plan, allocation_plan.allocate(plan, spec.allocation, scores.raw, target if spec.targets is None else None)


def _prune(job: _Job, setup: _Setup, method: Method, data: _Data, plan: Plan, allocation: LayerSparsities | None,
           label: str, home: BlockHome | None = None) -> list[str]:
    """The pruning stage: every planned tower block by block; returns the layers left dense."""
    with job.stage("pruning", total=setup.num_blocks, what=label):
        def block_done(done: int, total: int) -> None:
            job.on_progress(Progress("pruning", done, total, f"Pruned block {done} of {total}{label}."))

        # Offloading: the model stays on the CPU and each block visits the device in turn.
        checkpoint = job.checkpoint
        return prune_towers(setup.model.module, plan, method, job.spec.pattern, data.calibration, CALIBRATION_BATCH,
                            on_block=block_done, should_cancel=job.should_cancel,
                            device=job.device if job.placement.mode in (OFFLOAD_CPU, OFFLOAD_DISK) else None,
                            resume=setup.resume,
                            after_block=checkpoint.after_block if checkpoint is not None else None,
                            layer_sparsity=allocation.layer_sparsity if allocation is not None else None,
                            home=home, storage_dtypes=setup.model.storage_dtypes)


def _prune_streamed(job: _Job, setup: _Setup, method: Method, data: _Data, plan: Plan,
                    allocation: LayerSparsities | None, label: str, folder: Path) -> tuple[list[str], dict[str, int]]:
    """The pruning stage of a model streamed from disk: each block read from the input, pruned, written to the
    output in the input's dtype and released; then everything not pruned copied over, so that the output is a
    complete model folder before the pruned model is measured (from it). Returns the layers left dense and every
    pruned layer's zeros."""
    streamed = setup.model.streamed
    assert streamed is not None
    streamed.start_output(folder, job.spec.output_shard_bytes,
                          [(tower.blocks[index], f"{tower.prefix}.{index}") for tower, _ in plan
                           for index in range(len(tower.blocks))])
    home = DiskHome(streamed)
    unused = _prune(job, setup, method, data, plan, allocation, label, home)
    streamed.finish_output()
    return unused, home.zeros


def _restore(job: _Job, setup: _Setup, data: _Data, layer_names: list[str],
             dense_weights: dict[str, torch.Tensor] | None, label: str) -> dict[str, Any]:
    """The restoring stage: the pruned model's quality first (when the job measures it), then fine-tuning."""
    spec, model = job.spec.restore, setup.model
    assert spec is not None
    name = "SparseLoRA" if spec.method == "sparse-lora" else "plain LoRA"
    with job.stage("restoring", total=spec.steps, what=f"{name} ({spec.steps} steps){label}"):
        before: Quality = {}
        if data.measured:
            job.on_progress(Progress("restoring", 0, spec.steps,
                                     f"Measuring the {data.measured} of the pruned model before restoration{label}."))
            before = _measure(job, data, model, "pruned")
        sparsity_before = sparsity_report(model.module, layer_names)["achieved"]
        modules = dict(model.module.named_modules())
        restored = restore.restore_pruned(model.adapter, model.loaded.tokenizer, {n: modules[n] for n in layer_names},
                                          spec, setup.calibration, dense_weights, job.on_progress, job.should_cancel,
                                          label)
    restored["sparsity_before_merge"] = round(sparsity_before, 6)
    for key in _QUALITY:
        if key in before:
            restored[f"{key}_before"] = before[key]["pruned"]
    if "tasks" in before:
        restored["tasks_before"] = before["tasks"]["pruned"]
    return restored


# --- a quality-budget job -------------------------------------------------------------------


@dataclass
class _Probed:
    """One probe of a budget job: the model pruned to `target`, what that left dense, and its quality."""

    target: float
    unused: list[str]
    quality: Quality


def _budget_job(job: _Job, setup: _Setup, method: Method, data: _Data, dense: Quality, scores: Scores | None,
                dense_weights: dict[str, torch.Tensor] | None) -> Result:
    """The highest sparsity of the budget's grid whose pruned model keeps the bound (budget_search.py).

    One calibration, one dense measurement and one scoring pass serve every probe. A probe prunes the dense
    weights, put back from CPU copies (pruning feeds pruned outputs forward, so it starts from the dense model
    every time), and measures on the held-out evaluation data. The chosen model is the last probe's when it was
    the last one made, else pruned once more; it alone is restored (when asked) and saved."""
    budget = job.spec.budget
    assert budget is not None
    bound = budget_search.bound_of(budget, dense)
    layers = {name: layer for tower, _ in setup.plan for name, layer in tower_layers(tower).items()}
    # Restoration's teacher is the same dense weights: one copy serves both.
    originals = dense_weights if dense_weights is not None else restore.dense_copies(layers)
    most = budget_search.max_probes(len(budget_search.grid(budget.min_sparsity, budget.max_sparsity, budget.step)))
    probes: list[_Probed] = []

    def measure(target: float) -> float | None:
        if probes:
            _put_back(layers, originals)
        plan, allocation = _allocate(job, setup, scores, target)
        label = f" at sparsity {target:g} (probe {len(probes) + 1} of at most {most})"
        unused = _prune(job, setup, method, data, plan, allocation, label)
        with job.stage("budget_search", total=most, done=len(probes),
                       what=f"Measuring the {data.measured} of the pruned model{label}."):
            quality = _measure(job, data, setup.model, "pruned")
        probes.append(_Probed(target, unused, quality))
        return quality.get(bound.metric, {}).get("pruned")

    def report(probe: budget_search.Probe, number: int) -> None:
        job.on_progress(Progress("budget_search", number, most, budget_search.probe_message(bound, probe, number,
                                                                                            most)))

    outcome = budget_search.run_search(budget, bound, measure, report)
    if outcome.chosen is None:
        raise outcome.unreachable()
    chosen = outcome.chosen.sparsity
    last = probes[-1] if same_sparsity(probes[-1].target, chosen) else None
    if last is None:
        _put_back(layers, originals)
    run = _prune_one(job, setup, method, data, scores, dense_weights, chosen, last)
    result = _result(job, setup, data, dense, scores, [run])
    result.metrics["budget"] = outcome.record(budget)
    result.report["budget"] = result.metrics["budget"]
    return result


def _put_back(layers: dict[str, torch.nn.Module], originals: dict[str, torch.Tensor]) -> None:
    """The dense weights again, in place (on whatever device each layer lives)."""
    with torch.no_grad():
        for name, layer in layers.items():
            layer.weight.data.copy_(originals[name])


# --- the result ------------------------------------------------------------------------------------------


def _result(job: _Job, setup: _Setup, data: _Data, dense: Quality, scores: Scores | None,
            runs: list[PrunedRun]) -> Result:
    # The job's own sparsity (the API makes it one of a sweep's) is the run the top-level metrics describe.
    first = next((run for run in runs if math.isclose(run.target, job.spec.sparsity, abs_tol=1e-9)), runs[0])
    metrics = _metrics(job, setup, dense, scores, runs, first)
    return Result(output_dir=job.output_dir, metrics=metrics,
                  report=_report(job, setup, data, metrics, scores, runs, first))


def _metrics(job: _Job, setup: _Setup, dense: Quality, scores: Scores | None, runs: list[PrunedRun],
             first: PrunedRun) -> dict[str, Any]:
    sparsity = first.sparsity
    quality = {key: {**dense.get(key, {}), **first.pruned.get(key, {})}
               for key in _QUALITY if key in dense or key in first.pruned}
    metrics: dict[str, Any] = {
        "sparsity": {"target": _overall_target(first.plan, sparsity["layers"]),
                     "achieved": round(sparsity["achieved"], 6),
                     "per_layer": {name: round(value, 6) for name, value in sparsity["per_layer"].items()},
                     "per_tower": first.per_tower,
                     "targets": {tower.name: value for tower, value in first.plan}},
        **quality,
        **_task_metrics(dense, first.pruned),
        "timings_s": job.timings,
        "peak_memory_mb": job.memory.peak_mb(),
        "memory": _memory(job),
        "num_parameters": sum(p.numel() for p in setup.model.module.parameters()),
        "num_pruned_parameters": sparsity["num_zeros"],
    }
    if scores is not None:
        assert first.allocation is not None
        allocation = job.spec.allocation
        metrics["allocation"] = {"name": allocation.name, "granularity": allocation.granularity,
                                 **scores.info, "per_tower": first.allocation.per_tower}
    if first.restore is not None:
        metrics["restore"] = {key: value for key, value in first.restore.items() if key != "data"}
    if job.spec.sweep:
        metrics["sweep"] = [_sweep_row(run, dense, job.output_dir) for run in runs]
    return metrics


def _report(job: _Job, setup: _Setup, data: _Data, metrics: dict[str, Any], scores: Scores | None,
            runs: list[PrunedRun], first: PrunedRun) -> dict[str, Any]:
    """The metrics and everything behind them: layers, spec, model, data, environment, checkpointing."""
    model = setup.model  # in a sweep, the one loaded last
    report = {
        **metrics,
        "layers": first.sparsity["layers"],
        "num_prunable_parameters": first.sparsity["num_prunable_parameters"],
        "spec": _plain(spec_record(job.spec)),
        "model": {"source": model.loaded.source, "family": model.adapter.family, "num_blocks": setup.num_blocks,
                  "dtype": str(next(model.module.parameters()).dtype),
                  "towers": [{"name": t.name, "module": t.prefix, "num_blocks": len(t.blocks),
                              "pruned": any(t.name == planned.name for planned, _ in first.plan)}
                             for t in model.towers]},
        "unused_layers": first.unused,
        "data": data.info if first.restore is None else {**data.info, "restore": first.restore["data"]},
        "environment": _environment(job.device, job.memory),
        **({"checkpoint": job.checkpoint.summary()} if job.checkpoint is not None else {}),
    }
    if scores is not None:
        assert first.allocation is not None
        report["allocation"] = {**metrics["allocation"], "groups": first.allocation.groups}
        if job.spec.sweep:
            report["allocation"]["groups_per_sparsity"] = {
                f"{run.target:g}": run.allocation.groups for run in runs if run.allocation is not None}
    return report


def _sweep_row(run: PrunedRun, dense: Quality, output_dir: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"sparsity": run.target, "achieved": round(run.sparsity["achieved"], 6),
                           "per_tower": run.per_tower, "folder": run.folder.relative_to(output_dir).as_posix()}
    for key in _QUALITY:
        if key in run.pruned:
            row[key] = run.pruned[key].get("pruned")
            row[f"dense_{key}"] = dense.get(key, {}).get("dense")
    row.update(_task_metrics(dense, run.pruned))
    if run.allocation is not None:
        row["allocation_per_tower"] = run.allocation.per_tower
    if run.restore is not None:
        row["restore"] = {key: run.restore[key] for key in _SWEEP_RESTORE_KEYS if key in run.restore}
    return row


_SWEEP_RESTORE_KEYS = ("loss_first", "loss_last", "mask_preserved", "sparsity_before_merge", "sparsity_after_merge",
                       "perplexity_before", "accuracy_before", "seconds", "cpu_seconds")


def _task_metrics(dense: Quality, pruned: Quality) -> dict[str, Any]:
    """{"tasks": {name: {"dense": {"acc", "acc_norm", ...}, "pruned": {...}, "n": items}}}, or {}."""
    tasks: dict[str, Any] = {}
    for which, quality in (("dense", dense), ("pruned", pruned)):
        for name, score in quality.get("tasks", {}).get(which, {}).items():
            entry = tasks.setdefault(name, {})
            entry[which] = {key: value for key, value in score.items() if key != "n"}
            entry["n"] = score["n"]
    return {"tasks": tasks} if tasks else {}


def _overall_target(plan: Plan, layers: list[dict[str, Any]]) -> float:
    """The towers' targets weighted by their pruned weights: what `achieved` is measured against."""
    target_of = {layer: value for tower, value in plan for layer in tower_layers(tower)}
    numel = sum(layer["numel"] for layer in layers)
    if not numel:
        return plan[0][1] if plan else 0.0
    return round(sum(target_of[layer["name"]] * layer["numel"] for layer in layers) / numel, 6)


def _memory(job: _Job) -> dict[str, Any]:
    """metrics["memory"]: where the model lived, who chose it, against what budget, and the peaks."""
    record = {**job.placement.record(), "peak_rss_mb": job.memory.peak_rss_mb()}
    if job.device.type == "cuda":
        record["peak_device_mb"] = job.memory.peak_mb()
    return record


def _per_tower(model: torch.nn.Module, towers: list[Tower], unused: list[str],
               zeros: dict[str, int] | None = None) -> dict[str, float]:
    """Achieved sparsity of every tower, pruned or not (an untargeted tower shows 0.0: it stayed dense). A
    streamed model's zeros come counted; a tower it did not prune has none."""
    report: dict[str, float] = {}
    for tower in towers:
        names = [name for name in tower_layers(tower) if name not in unused]
        if zeros is not None and not all(name in zeros for name in names):
            report[tower.name] = 0.0
            continue
        report[tower.name] = round(sparsity_report(model, names, zeros)["achieved"], 6)
    return report


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
