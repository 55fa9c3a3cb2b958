"""Helpers shared by the benchmarks: the protocol's model, the run's environment, and the dense baseline.

Heavy imports (torch, transformers, the engine) happen inside the functions, so a parent process that only
spawns one child per configuration stays small and its own memory never counts in a child's peak RSS.
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/x.py`: the engine lives at the repository root
    sys.path.insert(0, str(ROOT))
MODEL_DIR = ROOT / "var" / "bench" / "models" / "smollm2-135m"
RESULTS_DIR = ROOT / "bench" / "results"
DATASET = "builtin:wiki-en"
MIB = 2**20


def ensure_model() -> Path:
    """The protocol's SmolLM2-135M as an fp32 HF folder, imported from the GGUF once and reused after."""
    if not (MODEL_DIR / "config.json").is_file():
        from prunekit.fixtures.demo_models import import_smollm2

        import_smollm2(MODEL_DIR)
    return MODEL_DIR


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def peak_rss_mb() -> float:
    """This process's peak RSS so far, as the protocol asks (getrusage; KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def git_commit() -> str:
    """HEAD, with "-dirty" when tracked or untracked files differ: the code measured may not be in HEAD.

    Results files are left out of the check, or resuming a run from a clean tree would count as dirty.
    """
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    head = git("rev-parse", "HEAD") or "unknown"
    return f"{head}-dirty" if git("status", "--porcelain", "--", ".", ":!bench/results") else head


def calibration_windows(tokenizer: Any, samples: int, seq_len: int, seed: int = 0) -> Any:
    """The protocol's calibration windows, cut by the engine's own code so they match what a job prunes on."""
    from workers.pruning import data

    return data.calibration_windows(data.token_stream(DATASET, tokenizer), samples, seq_len, seed)


def time_forward(model: Any, windows: Any, batch_size: int) -> float:
    """Wall seconds of one forward pass over all windows, batched as the pruning driver batches them."""
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        for batch in windows.split(batch_size):
            model(input_ids=batch, use_cache=False)  # the driver's capture pass runs without a KV cache
    return time.perf_counter() - start


def dense_forward_s(samples: int, seq_len: int) -> float:
    """The speed baseline: one dense forward pass over the calibration set, in the calling process."""
    from workers.pruning.models import load_model
    from workers.pruning.pipeline import CALIBRATION_BATCH

    loaded = load_model(MODEL_DIR, "cpu")
    return time_forward(loaded.model, calibration_windows(loaded.tokenizer, samples, seq_len), CALIBRATION_BATCH)


def write_json(dest: Path, value: Any) -> None:
    """Whole-file replace, so an interrupted run never leaves a truncated results file behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(dest)
