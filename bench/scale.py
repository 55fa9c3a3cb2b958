"""Scale benchmark (`make bench-scale`): models larger than memory, pruned from disk to disk block by block.

Rows (bench/results/scale.json), each one job through `workers.pruning.pipeline.run` in a fresh process:

- Wanda 0.5 streamed (`offload: "disk"`) on synthetic Llama models of about 0.1B, 0.5B, 1B and 3B parameters in
  fp32 (`prunekit models synth`: seeded random weights, SmolLM2's tokenizer; the 3B model is about 12 GB on disk),
  and SparseGPT 0.5 at 1B. Random weights say nothing of quality, so these jobs measure no perplexity; each row's
  speed baseline is one dense forward pass over the same calibration windows, itself streamed (each block read
  once) in the same process right after the job. Calibration: 16 windows of 512 tokens of builtin:wiki-en at every
  size (fewer than the protocol's 64, the same for all rows). Each synthetic model is written before its row and
  deleted after it (var/bench/synth): disk is shared.
- SmolLM2-135M under the protocol (64 x 512 calibration, perplexity on its 64 evaluation windows), Wanda 0.5, in
  memory and streamed: the same perplexity is expected, and the time streaming costs. Streamed once more with a
  checkpoint after every block (into a local folder, 64 MB shards): what checkpointing writes and costs, and how
  much of the output the checkpoint already holds (what publishing copies within the store instead of uploading).
  And once interrupted after 16 of its 30 blocks and resumed: what an interruption costs (`prune_cpu_s` sums both
  attempts' pruning stages).

`peak_rss_mb` is the job's own peak (VmHWM reset at its start), `model_bytes` the weights on disk.

    python bench/scale.py                          # every row not yet measured
    python bench/scale.py --only wanda-0.1b,smollm2-disk
    python bench/scale.py --quick                  # tiny sizes (0.01B, 4 windows of 128) -> scale-quick.json
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import rows
from common import MODEL_DIR, RESULTS_DIR, ROOT, cpu_model, ensure_model, git_commit, peak_rss_mb

SEED = 0
SYNTH_DIR = ROOT / "var" / "bench" / "synth"
# name -> (model: "synthetic" or "smollm2", parameters requested, method, offload)
CONFIGS: dict[str, tuple[str, float, str, str]] = {
    "wanda-0.1b": ("synthetic", 1e8, "wanda", "disk"),
    "wanda-0.5b": ("synthetic", 5e8, "wanda", "disk"),
    "wanda-1b": ("synthetic", 1e9, "wanda", "disk"),
    "sparsegpt-1b": ("synthetic", 1e9, "sparsegpt", "disk"),
    "wanda-3b": ("synthetic", 3e9, "wanda", "disk"),
    "smollm2-memory": ("smollm2", 0, "wanda", "memory"),
    "smollm2-disk": ("smollm2", 0, "wanda", "disk"),
    "smollm2-disk-checkpointed": ("smollm2", 0, "wanda", "disk"),
    "smollm2-disk-resumed": ("smollm2", 0, "wanda", "disk"),
}
# Rows that checkpoint after every block into a local folder, with shards of this size: 64 MB holds 4 of SmolLM2's
# fp32 blocks, as 2 GB shards hold 5 blocks of a 7B model in bf16.
CHECKPOINTED = {"smollm2-disk-checkpointed": 64 * 2**20, "smollm2-disk-resumed": 64 * 2**20}
# Rows interrupted after this many blocks (where a shard ends: a checkpoint was just saved) and run again: the
# resumed run restores the finished blocks and carries the calibration data through them again.
INTERRUPTED = {"smollm2-disk-resumed": 16}
SPARSITY = 0.5
SYNTH_CALIBRATION = {"num_samples": 16, "seq_len": 512}
QUICK_CALIBRATION = {"num_samples": 4, "seq_len": 128}
QUICK_PARAMS = 1e7
PROTOCOL = {"calibration_samples": 64, "evaluation_samples": 64, "seq_len": 512}
QUICK_PROTOCOL = {"calibration_samples": 8, "evaluation_samples": 8, "seq_len": 256}


class _Interrupted(Exception):
    """Stops a row's first attempt after INTERRUPTED blocks, as a crash would."""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def protocol(quick: bool) -> dict[str, Any]:
    return {"name": "benchmark-protocol.md", "dataset": "builtin:wiki-en", "device": "cpu", "seed": SEED,
            "sparsity": SPARSITY, "synthetic_calibration": QUICK_CALIBRATION if quick else SYNTH_CALIBRATION,
            "smollm2": QUICK_PROTOCOL if quick else PROTOCOL, "synthetic_dtype": "float32"}


def _synthetic(name: str, params: float) -> Path:
    from prunekit.models_root import smollm2_tokenizer
    from workers.pruning import synthetic

    dest = SYNTH_DIR / name
    shutil.rmtree(dest, ignore_errors=True)
    start = time.perf_counter()
    synthetic.write_synthetic_llama(dest, params, synthetic.parse_dtype("float32"), smollm2_tokenizer(), SEED)
    _log(f"  {name}: synthetic model written in {time.perf_counter() - start:.0f} s")
    return dest


def _streamed_dense_forward_s(model_dir: Path, windows: Any) -> float:
    """Wall seconds of one dense forward pass over `windows` with the model streamed (each block read once, the
    loss taken at the end as perplexity takes it): the speed baseline of a streamed row."""
    import torch

    from workers.pruning.models import find_towers
    from workers.pruning.pipeline import CALIBRATION_BATCH
    from workers.pruning.streaming import StreamedModel
    from workers.pruning.streaming_eval import streamed_perplexity

    streamed = StreamedModel(model_dir, torch.device("cpu"))
    try:
        tower = find_towers(streamed.model)[-1]
        blocks = [(f"{tower.prefix}.{index}", block) for index, block in enumerate(tower.blocks)]
        start = time.perf_counter()
        streamed_perplexity(streamed, streamed.model, blocks, windows, CALIBRATION_BATCH)
        return time.perf_counter() - start
    finally:
        streamed.close()


def run_config(name: str, quick: bool) -> dict[str, Any]:
    import torch
    from common import calibration_windows, time_forward
    from transformers import AutoTokenizer

    from workers.pruning import pipeline
    from workers.pruning.checkpoint import Checkpoint, FolderFiles
    from workers.pruning.models import load_model
    from workers.pruning.spec import CalibrationSpec, EvaluationSpec, Progress, PruneSpec
    from workers.pruning.weights_io import WeightFiles

    kind, params, method, offload = CONFIGS[name]
    if kind == "synthetic":
        model_dir = _synthetic(name, QUICK_PARAMS if quick else params)
        sizes = QUICK_CALIBRATION if quick else SYNTH_CALIBRATION
        calibration = CalibrationSpec(num_samples=sizes["num_samples"], seq_len=sizes["seq_len"], seed=SEED)
        evaluation = EvaluationSpec(perplexity=False)
    else:
        model_dir = MODEL_DIR
        sizes = QUICK_PROTOCOL if quick else PROTOCOL
        calibration = CalibrationSpec(num_samples=sizes["calibration_samples"], seq_len=sizes["seq_len"], seed=SEED)
        evaluation = EvaluationSpec(num_samples=sizes["evaluation_samples"], seq_len=sizes["seq_len"])
    try:
        with WeightFiles(model_dir) as files:
            model_bytes = files.total_bytes()
            num_parameters = sum(files.info(tensor).nbytes // files.info(tensor).dtype.itemsize
                                 for tensor in files.names())

        # Each attempt's pruning stage, as process CPU times at its start and its end (or its interruption).
        prune_cpu: list[float] = []
        interrupt_at = [INTERRUPTED.get(name)]  # cleared once the first attempt is stopped

        def progress(p: Progress) -> None:
            if p.stage == "pruning" and p.done in (0, p.total):
                prune_cpu.append(time.process_time())
            if p.done == p.total or (p.stage == "pruning" and p.done % 10 == 0):
                _log(f"  {name}: {p.stage} {p.done}/{p.total} {p.message}")
            if p.stage == "pruning" and p.done == interrupt_at[0]:
                prune_cpu.append(time.process_time())
                interrupt_at[0] = None
                raise _Interrupted

        spec = PruneSpec(model_dir=model_dir, method=method, sparsity=SPARSITY, calibration=calibration,
                         evaluation=evaluation, device="cpu", offload=offload)
        if name in CHECKPOINTED:
            spec = replace(spec, output_shard_bytes=CHECKPOINTED[name])
        scratch = ROOT / "var" / "bench" / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        stored: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(dir=scratch) as out:
            folder = Path(out) / "model"

            def attempt(number: int) -> Checkpoint | None:
                return (Checkpoint(FolderFiles(Path(out) / "checkpoint"), Path(out) / f"stage-{number}")
                        if name in CHECKPOINTED else None)

            checkpoint = attempt(1)
            try:
                result = pipeline.run(spec, folder, on_progress=progress, checkpoint=checkpoint)
            except _Interrupted:
                _log(f"  {name}: interrupted after block {INTERRUPTED[name]}; resuming")
                checkpoint = attempt(2)
                result = pipeline.run(spec, folder, on_progress=progress, checkpoint=checkpoint)
            output = sorted(path.name for path in folder.iterdir() if path.suffix == ".safetensors")
            if checkpoint is not None:
                output_bytes = sum((folder / shard).stat().st_size for shard in output)
                held = sum(saved.size_bytes for saved in checkpoint.stored_output(folder).values())
                summary = result.report["checkpoint"]
                stored = {"checkpoint": summary, "output_bytes": output_bytes, "held_by_checkpoint_bytes": held,
                          # What goes to the store in all, over the model's own bytes: the checkpoint's writes plus
                          # the output shards it does not hold (publishing copies the rest within the store).
                          "stored_over_output": round((summary["bytes_written"] + output_bytes - held)
                                                      / output_bytes, 4)}
        metrics = result.metrics
        gc.collect()
        row: dict[str, Any] = {
            "config": name, "method": method, "sparsity": SPARSITY, "model": kind, "params": num_parameters,
            "model_bytes": model_bytes, "mode": metrics.get("memory", {}).get("mode", offload),
            "memory": metrics.get("memory"), "peak_rss_mb": metrics["peak_memory_mb"],
            "process_peak_rss_mb": peak_rss_mb(), "achieved_sparsity": metrics["sparsity"]["achieved"],
            "prune_s": metrics["timings_s"]["pruning"], "timings_s": metrics["timings_s"],
            # Process CPU time (user + system, so page-cache reads count; waiting on the disk does not): on a
            # shared machine wall time swings with the other work, CPU time hardly does.
            "prune_cpu_s": round(sum(end - start for start, end in zip(prune_cpu[::2], prune_cpu[1::2],
                                                                         strict=True)), 3),
            "output_shards": output, "calibration": sizes, **stored,
            **({"interrupted_after": INTERRUPTED[name]} if name in INTERRUPTED else {}),
        }
        if kind == "smollm2":
            row["perplexity"] = metrics["perplexity"]["pruned"]
            row["dense_perplexity"] = metrics["perplexity"]["dense"]
        # The tokenizer alone: SmolLM2's folder holds the one the job used; a synthetic model has SmolLM2's.
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        windows = calibration_windows(tokenizer, calibration.num_samples, calibration.seq_len, SEED)
        cpu_start = time.process_time()
        if offload == "disk":
            row["dense_forward_s"] = round(_streamed_dense_forward_s(model_dir, windows), 3)
        else:
            loaded = load_model(model_dir, "cpu")
            cpu_start = time.process_time()  # loading is not part of the forward
            row["dense_forward_s"] = round(time_forward(loaded.model, windows, pipeline.CALIBRATION_BATCH), 3)
            del loaded
        row["dense_forward_cpu_s"] = round(time.process_time() - cpu_start, 3)
        row["prune_over_dense_forward"] = round(row["prune_s"] / row["dense_forward_s"], 3)
        row["prune_over_dense_forward_cpu"] = round(row["prune_cpu_s"] / row["dense_forward_cpu_s"], 3)
        row.update({"threads": torch.get_num_threads(), "cpu": cpu_model(), "torch": torch.__version__})
        return row
    finally:
        if kind == "synthetic":
            shutil.rmtree(model_dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, written to scale-quick.json")
    parser.add_argument("--only", help=f"comma-separated rows, of: {', '.join(CONFIGS)}")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_config(args.one, args.quick)), flush=True)
        return 0
    names = rows.choose(args.only, list(CONFIGS), parser.error)
    dest = RESULTS_DIR / ("scale-quick.json" if args.quick else "scale.json")
    proto, commit = protocol(args.quick), git_commit()
    if not args.only:
        names = rows.pending(names, dest, proto)
    if any(CONFIGS[name][0] == "smollm2" for name in names):
        ensure_model()

    def describe(row: dict[str, Any]) -> str:
        return (f"{row['params'] / 1e9:.2f}B params, {row['model_bytes'] / 2**30:.2f} GiB, mode {row['mode']}, "
                f"peak RSS {row['peak_rss_mb']} MB, prune {row['prune_s']} s = {row['prune_over_dense_forward']}x "
                f"a streamed dense forward")

    failed = rows.drive(__file__, names, dest, proto, commit, child_args=["--quick"] if args.quick else [],
                        order=list(CONFIGS), describe=describe)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
