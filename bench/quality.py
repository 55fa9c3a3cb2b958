"""Quality benchmark (`make bench-quality`): perplexity, achieved sparsity, pruning speed and peak RSS of every
method and pattern on SmolLM2-135M, under ../shared/benchmark-protocol.md (fp32, CPU).

Each configuration runs in a fresh process, so its peak RSS is its own. Pruning goes through
`workers.pruning.pipeline.run`, the code a service job runs. Its speed is reported as a ratio to one dense forward
pass over the same calibration windows, timed in the same process right after the job, so that a machine's
speed (or load from other work) cancels out of the ratio.

    python bench/quality.py                       # all configurations -> bench/results/quality-smollm2.json
    python bench/quality.py --quick               # smoke run, 8+8 windows of 256 -> quality-smollm2-quick.json
    python bench/quality.py --only wanda-0.5,sparsegpt-2:4
    python bench/quality.py --append              # resume: skip configurations already in the results file

Results are rewritten after every configuration, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import rows
from common import (
    MIB,
    MODEL_DIR,
    RESULTS_DIR,
    ROOT,
    calibration_windows,
    cpu_model,
    ensure_model,
    git_commit,
    peak_rss_mb,
    time_forward,
)

# name -> (method, pattern, target sparsity); an N:M pattern fixes the sparsity at 1 - n/m.
CONFIGS: dict[str, tuple[str, str | None, float]] = {
    "dense": ("dense", None, 0.0),
    "magnitude-0.5": ("magnitude", "unstructured", 0.5),
    "wanda-0.5": ("wanda", "unstructured", 0.5),
    "wanda-0.6": ("wanda", "unstructured", 0.6),
    "wanda-0.7": ("wanda", "unstructured", 0.7),
    "sparsegpt-0.5": ("sparsegpt", "unstructured", 0.5),
    "sparsegpt-0.7": ("sparsegpt", "unstructured", 0.7),
    "wanda-2:4": ("wanda", "2:4", 0.5),
    "sparsegpt-2:4": ("sparsegpt", "2:4", 0.5),
    "wanda-4:8": ("wanda", "4:8", 0.5),
}
SEED = 0
FULL = {"calibration_samples": 64, "evaluation_samples": 64, "seq_len": 512}
QUICK = {"calibration_samples": 8, "evaluation_samples": 8, "seq_len": 256}
RSS_SLACK_MB = 1024  # interpreter, libraries, tokenizer, token stream and allocator overhead
ACTIVATION_COPIES = 4  # the captured block inputs plus the temporaries of one block's forward (generous)


def protocol(sizes: dict[str, int]) -> dict[str, Any]:
    """Everything that must match for two rows to be comparable; the commit is deliberately not part of it."""
    return {"name": "benchmark-protocol.md", "model": "smollm2-135m", "dataset": "builtin:wiki-en",
            "dtype": "float32", "device": "cpu", "seed": SEED, **sizes}


class StageRss:
    """Peak resident memory per stage, sampled from /proc/self/status: says which stage sets the job's peak.

    Sampling misses spikes shorter than the period; the getrusage peak stays the figure of record.
    """

    def __init__(self, period_s: float = 0.05) -> None:
        self.stage = "startup"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(period_s,), daemon=True)
        self._thread.start()

    def _sample(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            rss = _vm_rss_mb()
            self.peaks[self.stage] = max(rss, self.peaks.get(self.stage, 0))

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return dict(self.peaks)


def _vm_rss_mb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_config(name: str, sizes: dict[str, int]) -> dict[str, Any]:
    """One configuration, in this process: prune (or just evaluate), then time the dense baseline."""
    import torch

    from workers.pruning import pipeline
    from workers.pruning.models import load_model
    from workers.pruning.spec import CalibrationSpec, EvaluationSpec, Progress, PruneSpec

    method, pattern, sparsity = CONFIGS[name]
    samples, eval_samples, seq_len = sizes["calibration_samples"], sizes["evaluation_samples"], sizes["seq_len"]
    row: dict[str, Any] = {"config": name, "method": method, "allocation": "uniform", "pattern": pattern,
                           "sparsity": sparsity, "seed": SEED}
    rss = StageRss()
    if method == "dense":
        row.update(_dense_quality(eval_samples, seq_len, rss))
    else:
        prune_cpu: list[float] = []

        def progress(p: Progress) -> None:
            rss.stage = p.stage
            if p.stage == "pruning" and p.done in (0, p.total):  # the stage's process CPU time, start and end
                prune_cpu.append(time.process_time())
            if p.stage != "pruning" or p.done == p.total or (p.done and p.done % 5 == 0):
                _log(f"  {name}: {p.stage} {p.done}/{p.total}")

        spec = PruneSpec(model_dir=MODEL_DIR, method=method, sparsity=sparsity, pattern=pattern or "unstructured",
                         calibration=CalibrationSpec(num_samples=samples, seq_len=seq_len, seed=SEED),
                         evaluation=EvaluationSpec(num_samples=eval_samples, seq_len=seq_len), device="cpu")
        # Under var/: /tmp may be a RAM disk, whose pages would compete with the job for memory.
        scratch = ROOT / "var" / "bench" / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch) as out:
            metrics = pipeline.run(spec, Path(out) / "model", on_progress=progress).metrics
        row.update({"achieved_sparsity": metrics["sparsity"]["achieved"],
                    "perplexity": metrics["perplexity"]["pruned"],
                    "dense_perplexity": metrics["perplexity"]["dense"],
                    "prune_s": metrics["timings_s"]["pruning"], "timings_s": metrics["timings_s"],
                    # With one torch thread, CPU time is the work done: unlike wall time it hardly grows when other
                    # processes share the cores, so the speed ratio below is taken from it too.
                    "prune_cpu_s": round(prune_cpu[-1] - prune_cpu[0], 3),
                    # The engine's own peak (VmHWM reset at the job's start): a check on the getrusage figure.
                    "job_peak_rss_mb": metrics["peak_memory_mb"]})
    gc.collect()
    # Read before the baseline runs: the peak is the configuration's own, not the timing pass's.
    row["peak_rss_mb"] = peak_rss_mb()
    row["stage_peak_rss_mb"] = rss.stop()
    # The bound is about the block-by-block driver; evaluation's logits are a different budget, so the
    # pruning stage gets its own figure beside the whole job's.
    row["pruning_peak_rss_mb"] = row["stage_peak_rss_mb"].get("pruning")

    _log(f"  {name}: dense forward over the calibration set")
    loaded = load_model(MODEL_DIR, "cpu")
    windows = calibration_windows(loaded.tokenizer, samples, seq_len, SEED)
    cpu_start = time.process_time()
    row["dense_forward_s"] = round(time_forward(loaded.model, windows, pipeline.CALIBRATION_BATCH), 3)
    row["dense_forward_cpu_s"] = round(time.process_time() - cpu_start, 3)
    row["prune_over_dense_forward"] = (None if row["prune_s"] is None
                                       else round(row["prune_s"] / row["dense_forward_s"], 3))
    if row.get("prune_cpu_s") is not None:
        row["prune_over_dense_forward_cpu"] = round(row["prune_cpu_s"] / row["dense_forward_cpu_s"], 3)

    model_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    activation_bytes = samples * seq_len * int(loaded.model.config.hidden_size) * 4
    bound = model_bytes / MIB + ACTIVATION_COPIES * activation_bytes / MIB + RSS_SLACK_MB
    row.update({"dense_model_mb": round(model_bytes / MIB, 1), "block_activation_mb": round(activation_bytes / MIB, 1),
                "rss_bound_mb": round(bound, 1), "within_rss_bound": row["peak_rss_mb"] <= bound,
                "pruning_within_rss_bound": (None if row["pruning_peak_rss_mb"] is None
                                             else row["pruning_peak_rss_mb"] <= bound),
                "threads": torch.get_num_threads(), "cpu": cpu_model(), "torch": torch.__version__})
    return row


def _dense_quality(eval_samples: int, seq_len: int, rss: StageRss) -> dict[str, Any]:
    """The unpruned model measured as a job measures it: same windows, same perplexity code, same batch."""
    from workers.pruning import data
    from workers.pruning.evaluate import perplexity, sparsity_report
    from workers.pruning.models import load_model, prunable_layers
    from workers.pruning.pipeline import EVALUATION_BATCH

    start = time.perf_counter()
    rss.stage = "loading"
    loaded = load_model(MODEL_DIR, "cpu")
    windows = data.evaluation_windows(data.token_stream(data.BUILTIN_WIKI_EN, loaded.tokenizer), eval_samples,
                                      seq_len)
    loading_s = time.perf_counter() - start
    start = time.perf_counter()
    rss.stage = "evaluation_dense"
    ppl = perplexity(loaded.model, windows, EVALUATION_BATCH)
    evaluation_s = time.perf_counter() - start
    # The dequantised 4-bit weights may hold exact zeros already: the floor every pruned row starts from.
    achieved = sparsity_report(loaded.model, list(prunable_layers(loaded.model)))["achieved"]
    return {"achieved_sparsity": round(achieved, 6), "perplexity": round(ppl, 4), "dense_perplexity": round(ppl, 4),
            "prune_s": None, "timings_s": {"loading_and_data": round(loading_s, 3),
                                           "evaluation_dense": round(evaluation_s, 3)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 calibration and 8 evaluation windows "
                                                             "of 256 tokens, written to a separate file")
    parser.add_argument("--only", help=f"comma-separated configurations, of: {', '.join(CONFIGS)}")
    parser.add_argument("--append", action="store_true",
                        help="skip configurations the results file already has under this protocol")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one configuration, a row on stdout
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.one:
        print(json.dumps(run_config(args.one, sizes)), flush=True)
        return 0

    names = rows.choose(args.only, list(CONFIGS), parser.error)
    dest = RESULTS_DIR / ("quality-smollm2-quick.json" if args.quick else "quality-smollm2.json")
    proto, commit = protocol(sizes), git_commit()  # the commit before this run writes anything
    if args.append:
        names = rows.pending(names, dest, proto)
    ensure_model()

    def describe(row: dict[str, Any]) -> str:
        return (f"perplexity {row['perplexity']}, prune/forward {row.get('prune_over_dense_forward')}, "
                f"peak RSS {row['peak_rss_mb']} MB")

    # Rows of bench/allocation.py in the same file are kept, after these (ordered as CONFIGS).
    failed = rows.drive(__file__, names, dest, proto, commit, child_args=["--quick"] if args.quick else [],
                        order=list(CONFIGS), describe=describe)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
