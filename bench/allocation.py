"""Allocation benchmark (`make bench-allocation`): uniform, OWL, ECoFLaP zeroth- and first-order, each with Wanda
and SparseGPT at 0.5, 0.6 and 0.7 on SmolLM2-135M under ../shared/benchmark-protocol.md, plus the cost of
zeroth-order scoring (fast vs naive, and its peak memory against a dense forward pass and first-order scoring).

    python bench/allocation.py                    # every configuration not yet measured (resumes by itself)
    python bench/allocation.py --only wanda-ecoflap-zeroth-0.7,wanda-owl-0.7
    python bench/allocation.py --zeroth           # bench/results/zeroth-order.json only
    python bench/allocation.py --quick            # smoke sizes, separate files

Rows go to bench/results/allocation-smollm2.json and are merged into quality-smollm2.json (same keys as the
engine's rows, plus scoring_s and the per-block sparsities). Each configuration runs in a fresh process through
`workers.pruning.pipeline.run`, as a job runs; scores are kept in a local score cache (var/bench/score-cache),
so each allocation is scored once and reused at every sparsity and method, as the service's cache does:
`scoring_s` is the cost of that one scoring pass, `scoring_cache` says whether this row computed it.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rows
from common import MODEL_DIR, RESULTS_DIR, ROOT, cpu_model, ensure_model, git_commit, peak_rss_mb, write_json
from quality import FULL, QUICK, SEED, StageRss, protocol

ALLOCATIONS = ("uniform", "owl", "ecoflap-zeroth", "ecoflap-first", "alphapruning", "dlp")
METHODS = ("wanda", "sparsegpt")
SPARSITIES = (0.7, 0.5, 0.6)  # 0.7 first: the targets are about it
# cheapest scoring first
ALLOCATION_ORDER = ("owl", "ecoflap-first", "ecoflap-zeroth", "uniform", "alphapruning", "dlp")
# How each allocation scores. Zeroth-order perturbs 210 layers twice per sample, each a forward from the
# layer's block on: on a 2-core CPU, 4 samples of 128 tokens cost about as much as pruning itself.
OPTIONS: dict[str, dict[str, Any]] = {
    "owl": {"num_samples": 64},  # OWL reads Wanda's statistics: the whole calibration set, one dense pass
    "ecoflap-zeroth": {"num_samples": 4, "seq_len": 128, "perturbation": "tensor"},  # the reference
    "ecoflap-first": {"num_samples": 4, "seq_len": 128},
    "dlp": {"num_samples": 64},  # as OWL: the median of Wanda's scores over the whole calibration set
    "alphapruning": {},  # data-free: the weights' spectra alone
}
QUICK_OPTIONS: dict[str, dict[str, Any]] = {"owl": {"num_samples": 8}, "ecoflap-zeroth": {"num_samples": 2,
                                                                                        "seq_len": 64,
                                                                                        "perturbation": "tensor"},
                                            "ecoflap-first": {"num_samples": 2, "seq_len": 64},
                                            "dlp": {"num_samples": 8}, "alphapruning": {}}
# Zeroth-order variants (the name's part after the allocation), over the allocation's options: one direction per
# block instead of per matrix, on the same scoring data or on twice the windows at half the length.
VARIANTS: dict[str, dict[str, Any]] = {
    "block": {"perturbation": "block"},
    "block-8x64": {"perturbation": "block", "num_samples": 8, "seq_len": 64},
    # One direction per block and sample is a noisy estimate (|g.z| has a coefficient of variation of about 0.76):
    # more, shorter windows average more directions over the same tokens (16 x 32) or twice them (32 x 32).
    "block-16x32": {"perturbation": "block", "num_samples": 16, "seq_len": 32},
    "block-32x32": {"perturbation": "block", "num_samples": 32, "seq_len": 32},
}
# Every stochastic row at 0.7 is measured with these calibration seeds (windows and directions both change).
SEEDS = (0, 1, 2)
# The fast-vs-naive comparison: every layer of every BLOCK_STRIDE-th block from the middle of the first stride
# (blocks 2, 7, ..., 27 of 30): on average as many blocks after them as after a layer anywhere in the model, so the
# sampled speedup is the whole model's; each mode alternated twice.
ZEROTH = {"num_samples": 1, "seq_len": 128}
BLOCK_STRIDE = 5
SCORE_CACHE = ROOT / "var" / "bench" / "score-cache"


@dataclass(frozen=True)
class Config:
    method: str
    allocation: str
    sparsity: float
    seed: int = SEED
    variant: str = ""  # a key of VARIANTS, or "" for the allocation's own options

    @property
    def name(self) -> str:
        variant = f"-{self.variant}" if self.variant else ""
        seed = f"-s{self.seed}" if self.seed != SEED else ""
        return f"{self.method}-{self.allocation}{variant}-{self.sparsity:g}{seed}"

    @property
    def job(self) -> tuple[str, str, str, int]:
        """What one job shares: its sparsities run as one sweep."""
        return self.method, self.allocation, self.variant, self.seed

    def options(self, quick: bool) -> dict[str, Any]:
        return {**(QUICK_OPTIONS if quick else OPTIONS).get(self.allocation, {}), **VARIANTS.get(self.variant, {})}


def configs() -> dict[str, Config]:
    """Uniform rows that bench/quality.py measures already (wanda-0.7, ...) are not measured twice; its rows are
    seed 0, the other seeds of uniform at 0.7 are measured here."""
    from quality import CONFIGS

    known: list[Config] = []
    for sparsity in SPARSITIES:
        for method in METHODS:
            for allocation in ALLOCATION_ORDER:
                if not (allocation == "uniform" and f"{method}-{sparsity:g}" in CONFIGS):
                    known.append(Config(method, allocation, sparsity))
    for seed in SEEDS[1:]:  # the variance of every stochastic row at 0.7
        for method in METHODS:
            for allocation in ("uniform", "ecoflap-zeroth", "ecoflap-first"):
                known.append(Config(method, allocation, 0.7, seed))
    for variant in VARIANTS:
        for seed in SEEDS:
            known.append(Config("wanda", "ecoflap-zeroth", 0.7, seed, variant))
    return {config.name: config for config in known}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_configs(names: list[str], sizes: dict[str, int], quick: bool) -> list[dict[str, Any]]:
    """Rows of one method and allocation at one or more sparsities, from one job: a single sparsity is a plain
    job; several are a sweep (one calibration, one dense evaluation, one scoring pass, then each sparsity pruned
    from the dense weights), as a user would run them. A row's prune_s is its own pruning pass; timings_s,
    scoring and the peak RSS are the job's, shared by its rows."""
    import torch

    from workers.pruning import pipeline
    from workers.pruning.allocation.cache import FolderScoreCache
    from workers.pruning.spec import AllocationSpec, CalibrationSpec, EvaluationSpec, Progress, PruneSpec

    chosen_configs = [configs()[name] for name in names]
    first = chosen_configs[0]
    method, allocation, seed = first.method, first.allocation, first.seed
    if any(config.job != first.job for config in chosen_configs):
        raise ValueError(f"one job runs one method, allocation, variant and seed: {names}")
    sparsities = sorted(config.sparsity for config in chosen_configs)
    label = ",".join(names)
    samples, eval_samples, seq_len = sizes["calibration_samples"], sizes["evaluation_samples"], sizes["seq_len"]
    options = first.options(quick)
    rss = StageRss()
    prune_started: list[float] = []
    prune_seconds: list[float] = []

    def progress(p: Progress) -> None:
        rss.stage = p.stage
        if p.stage == "pruning" and p.done == 0:
            prune_started.append(time.perf_counter())
        if p.stage == "pruning" and p.done == p.total:
            prune_seconds.append(round(time.perf_counter() - prune_started[-1], 3))
        if p.stage not in ("pruning", "scoring") or p.done == p.total or (p.done and p.done % 30 == 0):
            _log(f"  {label}: {p.stage} {p.done}/{p.total} {p.message if p.stage == 'scoring' else ''}")

    spec = PruneSpec(model_dir=MODEL_DIR, method=method, sparsity=sparsities[0],
                     calibration=CalibrationSpec(num_samples=samples, seq_len=seq_len, seed=seed),
                     evaluation=EvaluationSpec(num_samples=eval_samples, seq_len=seq_len), device="cpu",
                     allocation=AllocationSpec(name=allocation, **options),
                     sweep=tuple(sparsities) if len(sparsities) > 1 else ())
    scratch = ROOT / "var" / "bench" / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    cache = FolderScoreCache(SCORE_CACHE / ("quick" if quick else "full"))
    with tempfile.TemporaryDirectory(dir=scratch) as out:
        result = pipeline.run(spec, Path(out) / "model", on_progress=progress, score_cache=cache)
    metrics, report = result.metrics, result.report
    chosen = metrics.get("allocation", {})
    runs = metrics.get("sweep") or [{"sparsity": sparsities[0], "achieved": metrics["sparsity"]["achieved"],
                                     "perplexity": metrics["perplexity"]["pruned"],
                                     "dense_perplexity": metrics["perplexity"]["dense"]}]
    groups = report.get("allocation", {}).get("groups_per_sparsity") or (
        {f"{sparsities[0]:g}": report["allocation"]["groups"]} if "allocation" in report else {})
    gc.collect()
    peak, stage_peaks = peak_rss_mb(), rss.stop()

    from common import calibration_windows, time_forward

    from workers.pruning.models import load_model

    loaded = load_model(MODEL_DIR, "cpu")
    windows = calibration_windows(loaded.tokenizer, samples, seq_len, seed)
    dense_forward_s = round(time_forward(loaded.model, windows, pipeline.CALIBRATION_BATCH), 3)
    measured = []
    for run, prune_s in zip(runs, prune_seconds, strict=True):
        sparsity = run["sparsity"]
        row: dict[str, Any] = {
            "config": Config(method, allocation, sparsity, seed, first.variant).name, "method": method,
            "allocation": allocation, "pattern": "unstructured", "sparsity": sparsity, "seed": seed,
            "variant": first.variant or None, "allocation_options": options,
            "achieved_sparsity": run["achieved"], "perplexity": run["perplexity"],
            "dense_perplexity": run["dense_perplexity"], "prune_s": prune_s, "timings_s": metrics["timings_s"],
            "scoring_s": (None if allocation == "uniform"
                          else chosen.get("scoring_s") or chosen.get("cached_scoring_s")),
            "scoring_cache": chosen.get("cache"),
            "block_sparsity": ({group["name"].rsplit(".", 1)[-1]: round(group["sparsity"], 4)
                                for group in groups[f"{sparsity:g}"]} if groups else None),
            "job_peak_rss_mb": metrics["peak_memory_mb"], "peak_rss_mb": peak, "stage_peak_rss_mb": stage_peaks,
            "dense_forward_s": dense_forward_s, "prune_over_dense_forward": round(prune_s / dense_forward_s, 3),
            "threads": torch.get_num_threads(), "cpu": cpu_model(), "torch": torch.__version__,
        }
        if len(sparsities) > 1:
            row["job_sweep"] = sparsities  # timings_s, scoring and peak RSS are this one job's, shared
        if row["scoring_s"] is not None:
            row["scoring_over_dense_forward"] = round(row["scoring_s"] / dense_forward_s, 3)
        measured.append(row)
    return measured


# --- zeroth-order scoring: fast vs naive, memory ------------------------------------------------------------


# SmolLM2's tied 49,152-word head is 21% of its forward pass: every re-forward of the fast path, however late its
# block, pays it, which caps the fast path's gain on this model near 1.6x. The same 30 blocks under a head of
# LLaMA-7B's share (2x4096x32000 of its 2x6.7G multiply-adds a token, 2%) show what the fast path does where the
# blocks are most of the work, as in the 7B-and-larger models the service is for.
SMALL_HEAD_VOCAB = 4096  # 2x576x4096 of SmolLM2's 2x106M per token: 2.2%


def small_head_model() -> tuple[Any, Any]:
    """SmolLM2-135M's architecture (its 30 blocks, same shapes) with a SMALL_HEAD_VOCAB-word tied head, seeded
    random weights (the speed of a forward pass does not depend on them), and random token ids to score on."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(MODEL_DIR)
    config.vocab_size = SMALL_HEAD_VOCAB
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 2
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ids = torch.randint(3, SMALL_HEAD_VOCAB, (ZEROTH["num_samples"], ZEROTH["seq_len"]),
                        generator=torch.Generator().manual_seed(SEED))
    return model, ids


def zeroth_child(mode: str, out: Path) -> dict[str, Any]:
    """One measurement in this (fresh) process: `dense` (one forward over the scoring batch, batch 1 as scoring
    runs), `zeroth` (fast and naive zeroth-order scoring, alternated twice so that load from other work on the
    machine falls on both alike; the median of each), `zeroth-small-head` (the same on SmolLM2's blocks under a
    head of LLaMA-7B's share, see small_head_model) or `first` (first-order scoring)."""
    import torch
    from common import calibration_windows

    from workers.pruning.allocation import scoring
    from workers.pruning.models import block_linears, find_towers, load_model
    from workers.pruning.sequential import ModelInputs

    if mode == "zeroth-small-head":
        model, windows = small_head_model()
    else:
        loaded = load_model(MODEL_DIR, "cpu")
        model = loaded.model
        windows = calibration_windows(loaded.tokenizer, ZEROTH["num_samples"], ZEROTH["seq_len"], SEED)
    inputs = ModelInputs({"input_ids": windows}, {"use_cache": False})
    towers = find_towers(model)
    sample = {f"{tower.prefix}.{index}.{name}" for tower in towers for index, block in enumerate(tower.blocks)
              if index % BLOCK_STRIDE == BLOCK_STRIDE // 2 for name in block_linears(block)}
    gc.collect()
    result: dict[str, Any] = {"mode": mode, "rss_before_mb": peak_rss_mb()}
    scores: dict[str, Any] = {}
    if mode == "dense":
        start = time.perf_counter()
        with torch.inference_mode():
            for row in range(windows.shape[0]):
                scoring.model_loss(model, {"input_ids": windows[row:row + 1], "use_cache": False})
        result["seconds"] = round(time.perf_counter() - start, 3)
    elif mode in ("zeroth", "zeroth-small-head"):
        # Process CPU time as well as wall time: with one torch thread it is the work done, and unlike wall time it
        # does not grow when other processes share the cores, so the speedup is taken from it.
        times: dict[str, list[float]] = {"fast": [], "naive": []}
        cpu: dict[str, list[float]] = {"fast": [], "naive": []}
        for _ in range(2):
            for kind in ("fast", "naive"):
                start, cpu_start = time.perf_counter(), time.process_time()
                scores[kind] = scoring.zeroth_order_scores(model, towers, inputs, fast=kind == "fast", layers=sample)
                times[kind].append(round(time.perf_counter() - start, 3))
                cpu[kind].append(round(time.process_time() - cpu_start, 3))
                _log(f"  zeroth-order {kind}: {times[kind][-1]} s, {cpu[kind][-1]} CPU s")
        result.update({"fast_s": times["fast"], "naive_s": times["naive"],
                       "fast_cpu_s": cpu["fast"], "naive_cpu_s": cpu["naive"],
                       "fast_median_s": sum(times["fast"]) / 2, "naive_median_s": sum(times["naive"]) / 2,
                       "fast_median_cpu_s": sum(cpu["fast"]) / 2, "naive_median_cpu_s": sum(cpu["naive"]) / 2,
                       "identical_scores": scores["fast"] == scores["naive"]})
        scores = scores["fast"]
    else:
        start = time.perf_counter()
        scores = {name: value for name, value in scoring.first_order_scores(model, towers, inputs).items()
                  if name in sample}
        result["seconds"] = round(time.perf_counter() - start, 3)
    out.write_text(json.dumps(scores))
    result.update({"peak_rss_mb": peak_rss_mb(), "num_layers": len(scores)})
    return result


def zeroth_benchmark(commit: str, quick: bool) -> dict[str, Any]:
    import torch

    runs: dict[str, Any] = {}
    scores: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("dense", "zeroth", "first", "zeroth-small-head"):
            _log(f"zeroth-order benchmark: {mode}")
            path = Path(tmp) / f"{mode}.json"
            child = subprocess.run([sys.executable, __file__, "--zeroth-child", mode, str(path),
                                    *(["--quick"] if quick else [])],
                                   stdout=subprocess.PIPE, text=True, cwd=ROOT, check=True)
            runs[mode] = json.loads(child.stdout.strip().splitlines()[-1])
            scores[mode] = json.loads(path.read_text())
            _log(f"  {mode}: {runs[mode]}")
    zeroth, dense, small = runs["zeroth"], runs["dense"], runs["zeroth-small-head"]
    return {
        "protocol": {"name": "benchmark-protocol.md", "model": "smollm2-135m", "dataset": "builtin:wiki-en",
                     "dtype": "float32", "device": "cpu", "seed": SEED, **ZEROTH, "batch_size": 1, "eps": 1e-3,
                     "layers": f"every layer of every {BLOCK_STRIDE}th block from block {BLOCK_STRIDE // 2}"},
        "runs": runs,
        "fast_over_naive_speedup": round(zeroth["naive_median_cpu_s"] / zeroth["fast_median_cpu_s"], 3),
        "fast_over_naive_speedup_wall": round(zeroth["naive_median_s"] / zeroth["fast_median_s"], 3),
        # The same measurement with the head cut to LLaMA-7B's share of a forward pass (small_head_model).
        "small_head": {"vocab_size": SMALL_HEAD_VOCAB,
                       "fast_over_naive_speedup": round(small["naive_median_cpu_s"] / small["fast_median_cpu_s"], 3),
                       "fast_over_naive_speedup_wall": round(small["naive_median_s"] / small["fast_median_s"], 3),
                       "identical_scores": small["identical_scores"]},
        "identical_scores": zeroth["identical_scores"],
        "num_layers": zeroth["num_layers"],
        # Peak RSS of the process: the model plus whatever the measured work added on top of it.
        "zeroth_rss_over_dense_forward": round(zeroth["peak_rss_mb"] / dense["peak_rss_mb"], 3),
        "first_rss_over_dense_forward": round(runs["first"]["peak_rss_mb"] / dense["peak_rss_mb"], 3),
        "rank_agreement_zeroth_vs_first": _spearman(scores["zeroth"], scores["first"]),
        "commit": commit, "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
    }


# --- zeroth-order scoring's cost per variant, in CPU time -------------------------------------------------

# (perturbation, num_samples, seq_len) of every scoring measured against one dense forward over the calibration set
COST_VARIANTS = (("block", 4, 128), ("block", 8, 64), ("block", 16, 32), ("block", 32, 32), ("tensor", 4, 128))


def scoring_cost_child(out: Path) -> dict[str, Any]:
    """In this (fresh) process, 1 torch thread: one dense forward over the protocol's calibration set (64 x 512,
    batch 4 as pruning) and then whole zeroth-order scoring passes as a job runs them (every layer, the fast path),
    each in process CPU time: with one thread that is the work done, and unlike wall time it hardly grows when other
    processes share the cores. The dense pass runs again at the end; the baseline is the mean of the two."""
    import torch
    from common import calibration_windows

    from workers.pruning import pipeline
    from workers.pruning.allocation import scoring
    from workers.pruning.allocation.plan import score_inputs
    from workers.pruning.models import find_towers, load_model
    from workers.pruning.multimodal import adapt
    from workers.pruning.sequential import ModelInputs
    from workers.pruning.spec import AllocationSpec

    torch.set_num_threads(1)
    loaded = load_model(MODEL_DIR, "cpu")
    model = loaded.model
    windows = calibration_windows(loaded.tokenizer, FULL["calibration_samples"], FULL["seq_len"], SEED)
    towers = find_towers(model)

    def dense() -> tuple[float, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for batch in windows.split(pipeline.CALIBRATION_BATCH):
                model(input_ids=batch, use_cache=False)
        return time.process_time() - cpu_start, time.perf_counter() - start

    baseline = [dense()]
    rows_out = []
    for perturbation, samples, seq_len in COST_VARIANTS:
        spec = AllocationSpec(name="ecoflap-zeroth", perturbation=perturbation, num_samples=samples, seq_len=seq_len)
        inputs = score_inputs(model, ModelInputs({"input_ids": windows}, {"use_cache": False}), spec)
        start, cpu_start = time.perf_counter(), time.process_time()
        scoring.zeroth_order_scores(adapt(model), towers, inputs, spec.eps, SEED, perturbation=perturbation)
        cpu_s, wall_s = time.process_time() - cpu_start, time.perf_counter() - start
        rows_out.append({"perturbation": perturbation, "num_samples": samples, "seq_len": seq_len,
                         "cpu_s": round(cpu_s, 2), "wall_s": round(wall_s, 2)})
        _log(f"  scoring cost {rows_out[-1]}")
    baseline.append(dense())
    dense_cpu = sum(cpu for cpu, _ in baseline) / 2
    for row in rows_out:
        row["over_dense_forward_cpu"] = round(row["cpu_s"] / dense_cpu, 3)
    out.write_text("{}")
    return {"dense_forward_cpu_s": [round(cpu, 2) for cpu, _ in baseline],
            "dense_forward_wall_s": [round(wall, 2) for _, wall in baseline], "variants": rows_out,
            "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads()}


def scoring_cost(commit: str) -> dict[str, Any]:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        child = subprocess.run([sys.executable, __file__, "--zeroth-child", "cost", str(Path(tmp) / "cost.json")],
                               stdout=subprocess.PIPE, text=True, cwd=ROOT, check=True)
    result = json.loads(child.stdout.strip().splitlines()[-1])
    return {"protocol": {**protocol(FULL), "eps": 1e-3, "baseline": "one dense forward over the calibration set "
                                                                     "(64 x 512, batch 4), process CPU time"},
            **result, "commit": commit, "cpu": cpu_model(), "torch": torch.__version__}


def _spearman(a: dict[str, float], b: dict[str, float]) -> float:
    names = sorted(a)

    def ranks(values: list[float]) -> list[int]:
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0] * len(values)
        for rank, index in enumerate(order):
            result[index] = rank
        return result

    ra, rb = ranks([a[n] for n in names]), ranks([b[n] for n in names])
    n = len(names)
    return round(1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb, strict=True)) / (n * (n * n - 1)), 4)


# --- driver ---------------------------------------------------------------------------------------------------


def merge_into_quality(allocation_rows: list[dict[str, Any]], quick: bool) -> None:
    """Adds (or replaces) these rows in quality-smollm2.json, beside bench/quality.py's."""
    rows.store(RESULTS_DIR / ("quality-smollm2-quick.json" if quick else "quality-smollm2.json"), allocation_rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke sizes, written to *-quick.json files")
    parser.add_argument("--only", help="comma-separated configurations, e.g. wanda-owl-0.7")
    parser.add_argument("--zeroth", action="store_true", help="only the zeroth-order scoring benchmark")
    parser.add_argument("--scoring-cost", action="store_true",
                        help="only zeroth-order scoring's CPU cost per variant -> bench/results/scoring-cost.json")
    parser.add_argument("--merge", action="store_true", help="only merge allocation rows into quality-smollm2.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--zeroth-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.one:
        print(json.dumps(run_configs(args.one.split(","), sizes, args.quick)), flush=True)
        return 0
    if args.quick:
        ZEROTH.update(num_samples=1, seq_len=16)
    if args.zeroth_child and args.zeroth_child[0] == "cost":
        print(json.dumps(scoring_cost_child(Path(args.zeroth_child[1]))), flush=True)
        return 0
    if args.zeroth_child:
        print(json.dumps(zeroth_child(args.zeroth_child[0], Path(args.zeroth_child[1]))), flush=True)
        return 0

    ensure_model()
    commit = git_commit()
    if args.scoring_cost:
        write_json(RESULTS_DIR / "scoring-cost.json", scoring_cost(commit))
        return 0
    if args.zeroth:
        result = zeroth_benchmark(commit, args.quick)
        write_json(RESULTS_DIR / ("zeroth-order-quick.json" if args.quick else "zeroth-order.json"), result)
        _log(f"zeroth-order: fast {result['runs']['zeroth']['fast_median_cpu_s']} CPU s, naive "
             f"{result['runs']['zeroth']['naive_median_cpu_s']} CPU s ({result['fast_over_naive_speedup']}x), "
             f"identical {result['identical_scores']}")
        return 0
    dest = RESULTS_DIR / ("allocation-smollm2-quick.json" if args.quick else "allocation-smollm2.json")
    if args.merge:
        merge_into_quality(rows.load(dest), args.quick)
        return 0
    known = configs()
    names = rows.choose(args.only, list(known), parser.error)
    proto = protocol(sizes)
    if not args.only:  # resumes: rows already measured under this protocol are kept
        names = rows.pending(names, dest, proto)
    # One job per method and allocation: its sparsities as a sweep (one dense evaluation and scoring pass).
    jobs: dict[tuple[str, str, str, int], list[str]] = {}
    for name in names:
        jobs.setdefault(known[name].job, []).append(name)

    def describe(row: dict[str, Any]) -> str:
        return (f"perplexity {row['perplexity']}, scoring {row['scoring_s']} s ({row['scoring_cache']}), "
                f"prune/forward {row['prune_over_dense_forward']}")

    failed = rows.drive(__file__, [",".join(group) for group in jobs.values()], dest, proto, commit,
                        child_args=["--quick"] if args.quick else [], describe=describe,
                        after_store=lambda stored: merge_into_quality(stored, args.quick))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
