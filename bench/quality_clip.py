"""Vision quality benchmark (`make bench-clip`): zero-shot accuracy, achieved sparsity, pruning speed and peak RSS
of magnitude, Wanda and SparseGPT on the digits-clip fixture, under ../shared/benchmark-protocol.md (fp32, CPU).

digits-clip is the small CLIPModel the project trains itself (`prunekit/fixtures/digits_clip.py`); it is built into
var/models/digits-clip on first use (a minute or two) and reused while its recipe fingerprint matches. Every job
prunes both towers (vision and language) at the row's sparsity, unstructured, every layer alike (uniform), and
calibrates on builtin:digits' train split (a CLIP job left at the default dataset does). Accuracy is the job's
own zero-shot accuracy on the held-out digits with the ten digit prompts.

As in bench/quality.py: each configuration runs in a fresh process (its peak RSS is its own), pruning goes through
`workers.pruning.pipeline.run`, and its speed is a ratio to one dense forward pass over the same calibration inputs
(the engine's own, batched as the pruning driver batches them), timed in the same process right after the job.
That pass is a fraction of a second here, so it is timed after an untimed warm-up pass, REPEATS times, and the
median is the baseline (every repeat is kept in the row).

Torch runs one thread by default (`--threads`): the towers' matrices (hidden 128) are too small to gain from
intra-op parallelism, and on a shared 2-core machine a 2-thread pool waits on its descheduled thread at every
operation, which made the same dense pass take from 1 to 25 s instead of about 0.25 s.

    python bench/quality_clip.py                  # all -> bench/results/quality-digits-clip.json
    python bench/quality_clip.py --only wanda-0.5,sparsegpt-0.7
    python bench/quality_clip.py --append         # resume: skip configurations already in the results file
    python bench/quality_clip.py --threads 2      # torch threads in every configuration's process (default 1)

Results are rewritten after every configuration, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import rows
from common import RESULTS_DIR, ROOT, cpu_model, git_commit, peak_rss_mb

MODEL_DIR = ROOT / "var" / "models" / "digits-clip"
DATASET = "builtin:digits"
SEED = 0
NUM_SAMPLES = 128  # image-caption pairs of the train split (about 1,440), drawn without repeats
REPEATS = 5  # timed dense forward passes; the median is the baseline
DEST = RESULTS_DIR / "quality-digits-clip.json"

# name -> (method, target sparsity, allocation); every configuration is unstructured. The allocations are joint
# over both towers (ECoFLaP's setting): the split they choose is in each row (`allocation_per_tower`).
CONFIGS: dict[str, tuple[str, float, str]] = {"dense": ("dense", 0.0, "uniform")}
for _method in ("magnitude", "wanda", "sparsegpt"):
    for _sparsity in (0.3, 0.5, 0.7):
        CONFIGS[f"{_method}-{_sparsity}"] = (_method, _sparsity, "uniform")
for _allocation in ("owl", "ecoflap-first", "ecoflap-zeroth"):
    for _method in ("wanda", "sparsegpt"):
        for _sparsity in (0.5, 0.7):
            CONFIGS[f"{_method}-{_allocation}-{_sparsity}"] = (_method, _sparsity, _allocation)
# Scoring data: 32 pairs in batches of 8 (a contrastive loss needs several pairs); OWL reads all 128.
ALLOCATION_OPTIONS = {"owl": {"num_samples": NUM_SAMPLES}, "ecoflap-first": {"num_samples": 32},
                      # one direction per matrix, as measured before block became the default
                      "ecoflap-zeroth": {"num_samples": 32, "perturbation": "tensor"}}


def protocol() -> dict[str, Any]:
    """Everything that must match for two rows to be comparable; the commit is deliberately not part of it."""
    return {"name": "benchmark-protocol.md", "model": "digits-clip", "dataset": DATASET, "dtype": "float32",
            "device": "cpu", "seed": SEED, "num_samples": NUM_SAMPLES}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_config(name: str, threads: int) -> dict[str, Any]:
    """One configuration, in this process: prune (or just evaluate), then time the dense baseline."""
    import torch

    torch.set_num_threads(threads)

    from workers.pruning import multimodal, pipeline
    from workers.pruning.models import load_model
    from workers.pruning.spec import AllocationSpec, CalibrationSpec, EvaluationSpec, Progress, PruneSpec

    method, sparsity, allocation = CONFIGS[name]
    row: dict[str, Any] = {"config": name, "method": method, "allocation": allocation,
                           "pattern": None if method == "dense" else "unstructured", "sparsity": sparsity}
    # The calibration a job gets: left at the default dataset, a CLIP job calibrates on builtin:digits.
    calibration = CalibrationSpec(num_samples=NUM_SAMPLES, seed=SEED)
    evaluation = EvaluationSpec(perplexity=False, accuracy=True)
    if method == "dense":
        row.update(_dense_quality())
    else:
        def progress(p: Progress) -> None:
            if p.done == p.total and p.total > 1:
                _log(f"  {name}: {p.stage} {p.done}/{p.total}")

        options = ALLOCATION_OPTIONS.get(allocation, {})
        spec = PruneSpec(model_dir=MODEL_DIR, method=method, sparsity=sparsity, pattern="unstructured",
                         calibration=calibration, evaluation=evaluation, device="cpu",
                         allocation=AllocationSpec(name=allocation, **options))
        scratch = ROOT / "var" / "bench" / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch) as out:
            result = pipeline.run(spec, Path(out) / "model", on_progress=progress)
        metrics = result.metrics
        row.update({"achieved_sparsity": metrics["sparsity"]["achieved"],
                    "per_tower_sparsity": metrics["sparsity"]["per_tower"],
                    "tower_targets": metrics["sparsity"]["targets"],
                    "accuracy": metrics["accuracy"]["pruned"], "dense_accuracy": metrics["accuracy"]["dense"],
                    "prune_s": metrics["timings_s"]["pruning"], "timings_s": metrics["timings_s"],
                    "job_peak_rss_mb": metrics["peak_memory_mb"],
                    **({"allocation_options": options, "allocation_per_tower": metrics["allocation"]["per_tower"],
                        "scoring_s": metrics["allocation"]["scoring_s"]} if "allocation" in metrics else {}),
                    "calibration_data": {key: result.report["data"].get(key)
                                         for key in ("dataset", "dataset_requested", "images", "num_samples")}})
    gc.collect()
    # Read before the baseline runs: the peak is the configuration's own, not the timing pass's.
    row["peak_rss_mb"] = peak_rss_mb()

    _log(f"  {name}: dense forward over the calibration inputs")
    loaded = load_model(MODEL_DIR, "cpu")
    cal = replace(calibration, dataset=multimodal.calibration_dataset(loaded.model, calibration.dataset))
    inputs, _, _ = multimodal.job_data(loaded.model, loaded.tokenizer, cal, evaluation, calibrate=True,
                                       text_calibration=True)
    runs = _time_forward(loaded.model, inputs, pipeline.CALIBRATION_BATCH)
    row["dense_forward_s"] = round(statistics.median(runs), 4)
    row["dense_forward_runs_s"] = [round(seconds, 4) for seconds in runs]
    row["prune_over_dense_forward"] = (None if row["prune_s"] is None
                                       else round(row["prune_s"] / row["dense_forward_s"], 3))
    if row.get("scoring_s") is not None:
        row["scoring_over_dense_forward"] = round(row["scoring_s"] / row["dense_forward_s"], 3)
    row.update({"calibration_shapes": {key: list(value.shape) for key, value in inputs.tensors.items()},
                "threads": torch.get_num_threads(), "cpu": cpu_model(), "torch": torch.__version__})
    return row


def _time_forward(model: Any, inputs: Any, batch_size: int) -> list[float]:
    """Wall seconds of REPEATS whole forward passes over the calibration inputs, after one untimed pass."""
    import torch

    runs = []
    with torch.inference_mode():
        for repeat in range(REPEATS + 1):
            start = time.perf_counter()
            for batch in inputs.batches(batch_size, torch.device("cpu")):
                model(**batch)
            if repeat:  # the first pass warms allocators and kernels up
                runs.append(time.perf_counter() - start)
    return runs


def _dense_quality() -> dict[str, Any]:
    """The unpruned model measured as a job measures it: the same zero-shot code on the same held-out digits."""
    from workers.pruning.evaluate import sparsity_report
    from workers.pruning.models import find_towers, load_model, tower_layers
    from workers.pruning.zero_shot import digits_zero_shot_accuracy

    start = time.perf_counter()
    loaded = load_model(MODEL_DIR, "cpu")
    loading_s = time.perf_counter() - start
    start = time.perf_counter()
    accuracy = round(digits_zero_shot_accuracy(loaded.model, loaded.tokenizer), 4)
    evaluation_s = time.perf_counter() - start
    towers = find_towers(loaded.model)
    layers = [layer for tower in towers for layer in tower_layers(tower)]
    return {"achieved_sparsity": round(sparsity_report(loaded.model, layers)["achieved"], 6),
            "per_tower_sparsity": {tower.name: round(sparsity_report(loaded.model, list(tower_layers(tower)))
                                                     ["achieved"], 6) for tower in towers},
            "accuracy": accuracy, "dense_accuracy": accuracy, "prune_s": None,
            "timings_s": {"loading": round(loading_s, 3), "evaluation_dense": round(evaluation_s, 3)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma-separated configurations, of: {', '.join(CONFIGS)}")
    parser.add_argument("--append", action="store_true",
                        help="skip configurations the results file already has under this protocol")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per configuration (default 1)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one configuration, a row on stdout
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_config(args.one, args.threads)), flush=True)
        return 0

    names = rows.choose(args.only, list(CONFIGS), parser.error)
    proto, commit = protocol(), git_commit()  # the commit before this run writes anything
    if args.append:
        names = rows.pending(names, DEST, proto)
    # Built (or found up to date) in a process of its own, so training never counts in a row's peak RSS.
    subprocess.run([sys.executable, str(ROOT / "bench" / "build_digits_clip.py"), str(MODEL_DIR)], check=True,
                   stdout=sys.stderr, cwd=ROOT)

    def describe(row: dict[str, Any]) -> str:
        return (f"accuracy {row['accuracy']} (dense {row['dense_accuracy']}), per tower {row['per_tower_sparsity']}, "
                f"prune/forward {row.get('prune_over_dense_forward')}, peak RSS {row['peak_rss_mb']} MB")

    failed = rows.drive(__file__, names, DEST, proto, commit, child_args=["--threads", str(args.threads)],
                        order=list(CONFIGS), describe=describe)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
