"""The per-tower split a joint allocation chooses for `llava-smollm2` (the real SmolLM2 language tower with
digits-clip's vision tower): one budget over both towers, as ECoFLaP allocates a vision-language model.

    python bench/allocation_vlm.py        # -> bench/results/allocation-llava-smollm2.json

Only the allocation is computed (scores on builtin:digits image-caption pairs, then water-filling or OWL's
spread at each target), not the pruning: the question is how the budget is split between the towers.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from common import RESULTS_DIR, ROOT, cpu_model, ensure_model, git_commit, write_json

VISION_DIR = ROOT / "var" / "models" / "digits-clip"
LLAVA_DIR = ROOT / "var" / "bench" / "models" / "llava-smollm2"
TARGETS = (0.5, 0.7)
OPTIONS: dict[str, dict[str, Any]] = {"owl": {"num_samples": 32}, "ecoflap-first": {"num_samples": 16},
                                      # one direction per matrix, as measured before block became the default
                                      "ecoflap-zeroth": {"num_samples": 2, "perturbation": "tensor"}}
NUM_SAMPLES = 32
SEED = 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> int:
    import subprocess

    import torch

    from prunekit.fixtures.vlm_fixtures import build_llava_smollm2
    from workers.pruning import multimodal
    from workers.pruning.allocation import plan
    from workers.pruning.models import find_towers, load_model, plan_towers
    from workers.pruning.spec import AllocationSpec, CalibrationSpec

    language = ensure_model()
    if not (VISION_DIR / "config.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "bench" / "build_digits_clip.py"), str(VISION_DIR)], check=True)
    if not (LLAVA_DIR / "config.json").is_file():
        build_llava_smollm2(LLAVA_DIR, language, VISION_DIR)
    loaded = load_model(LLAVA_DIR, "cpu")
    model = loaded.model
    info: dict[str, Any] = {}
    inputs = multimodal.image_text_inputs(model, loaded.tokenizer,
                                          CalibrationSpec(dataset="builtin:digits", num_samples=NUM_SAMPLES,
                                                          seed=SEED), info)
    towers = find_towers(model)
    sizes = {tower.name: sum(layer.weight.numel() for block in tower.blocks for layer in block.modules()
                             if isinstance(layer, torch.nn.Linear)) for tower in towers}
    rows = []
    for name, options in OPTIONS.items():
        spec = AllocationSpec(name=name, **options)
        scoring_inputs = plan.score_inputs(model, inputs, spec)
        _log(f"{name}: scoring")
        start = time.perf_counter()
        raw = plan.raw_scores(model, towers, scoring_inputs, spec, SEED, lambda: False, lambda _d, _t: None)
        seconds = time.perf_counter() - start
        for target in TARGETS:
            chosen = plan.allocate(plan_towers(towers, target), spec, raw, joint_target=target)
            rows.append({"allocation": name, "target": target, "per_tower": chosen.per_tower, "options": options,
                         "scoring_s": round(seconds, 3),
                         "block_sparsity": {group["name"]: round(group["sparsity"], 4) for group in chosen.groups}})
            _log(f"{name} at {target}: {chosen.per_tower}")
    write_json(RESULTS_DIR / "allocation-llava-smollm2.json", {
        "model": "llava-smollm2", "calibration": {"dataset": "builtin:digits", "num_samples": NUM_SAMPLES,
                                                  "seed": SEED, **info},
        "tower_weights": sizes, "rows": rows, "commit": git_commit(), "cpu": cpu_model(),
        "threads": torch.get_num_threads(), "torch": torch.__version__})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
