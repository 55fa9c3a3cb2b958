"""Benchmark of the main job (`make bench`): magnitude and Wanda at 50% on SmolLM2-135M under
../shared/benchmark-protocol.md. Each configuration runs in a fresh process so its peak RSS is its own;
speed is reported as a ratio to one dense forward pass over the same calibration set, measured in the same run.

    python bench/main_job.py [--quick]     # writes bench/results/main-job.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import (
    MODEL_DIR,
    RESULTS_DIR,
    ROOT,
    cpu_model,
    dense_forward_s,
    ensure_model,
    git_commit,
    peak_rss_mb,
    write_json,
)

CONFIGS = [{"method": "dense"}, {"method": "magnitude", "sparsity": 0.5}, {"method": "wanda", "sparsity": 0.5}]


def run_one(config: dict[str, Any], samples: int, seq_len: int, eval_samples: int) -> dict[str, Any]:
    from workers.pruning.pipeline import run
    from workers.pruning.spec import CalibrationSpec, EvaluationSpec, PruneSpec

    if config["method"] == "dense":
        seconds = dense_forward_s(samples, seq_len)
        return {"method": "dense", "dense_forward_s": round(seconds, 2), "peak_rss_mb": peak_rss_mb()}
    spec = PruneSpec(model_dir=MODEL_DIR, method=config["method"], sparsity=config["sparsity"],
                     calibration=CalibrationSpec(num_samples=samples, seq_len=seq_len),
                     evaluation=EvaluationSpec(num_samples=eval_samples, seq_len=512), device="cpu")
    with tempfile.TemporaryDirectory() as out:
        result = run(spec, Path(out) / "model")
    m = result.metrics
    return {"method": config["method"], "allocation": "uniform", "pattern": "unstructured",
            "sparsity": config["sparsity"], "achieved_sparsity": m["sparsity"]["achieved"],
            "perplexity": m["perplexity"]["pruned"], "dense_perplexity": m["perplexity"]["dense"],
            "prune_s": m["timings_s"]["pruning"], "timings_s": m["timings_s"], "peak_rss_mb": peak_rss_mb()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="16 calibration and 16 evaluation windows")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    samples, eval_samples = (16, 16) if args.quick else (64, 64)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one), samples, 512, eval_samples)))
        return 0

    ensure_model()
    rows = []
    for config in CONFIGS:
        cmd = [sys.executable, __file__, "--one", json.dumps(config)] + (["--quick"] if args.quick else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    baseline = rows[0]["dense_forward_s"]
    for row in rows[1:]:
        row["dense_forward_s"] = baseline
        row["prune_over_dense_forward"] = round(row["prune_s"] / baseline, 2)
    commit = git_commit()
    result = {"protocol": "smollm2-135m / builtin:wiki-en (../shared/benchmark-protocol.md)",
              "calibration": {"num_samples": samples, "seq_len": 512}, "evaluation": {"num_samples": eval_samples,
                                                                                      "seq_len": 512},
              "cpu": cpu_model(), "threads": os.cpu_count(), "commit": commit,
              "rows": rows}
    dest = RESULTS_DIR / ("main-job-quick.json" if args.quick else "main-job.json")
    write_json(dest, result)
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
