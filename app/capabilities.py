"""What this server can do: the single list that request validation and GET /v1/capabilities share."""

from __future__ import annotations

from typing import Any

# The contract (api.md) names more values than this release runs; those are refused with a clear 422
# instead of being accepted and failing later on a GPU.
CONTRACT_METHODS = ("magnitude", "wanda", "sparsegpt")
CONTRACT_PATTERNS = ("unstructured", "2:4", "4:8")
CONTRACT_ALLOCATIONS = ("uniform", "ecoflap-zeroth", "ecoflap-first", "owl")

METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = ("unstructured", "2:4", "4:8")
ALLOCATIONS = ("uniform", "ecoflap-zeroth", "ecoflap-first", "owl")
RESTORATIONS = ("sparse-lora", "lora")
# Families the engine has a tiny test model of (prunekit/fixtures/demo_models.py) and prunes end to end.
MODEL_FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "opt", "clip", "llava", "blip-2")
# Towers a job's `targets` may name (per-tower sparsity of vision-language models; CLIP's text is "language").
TOWERS = ("vision", "qformer", "language")
BUILTIN_DATASETS = {"builtin:wiki-en": "text", "builtin:digits": "image-text"}
# config.json model_type of the families with a vision tower: the only ones an image-text dataset can calibrate.
VISION_MODEL_TYPES = ("clip", "llava", "blip-2")
MODEL_SCHEMES = ("local", "hf", "s3")

LIMITS = {
    "calibration_num_samples": 1024,
    "calibration_seq_len": 4096,
    "evaluation_num_samples": 1024,
    "evaluation_seq_len": 4096,
    "allocation_num_samples": 256,
    "sweep_sparsities": 10,
    "restore_steps": 100_000,
    "restore_rank": 256,
    "restore_batch_size": 256,
    "metadata_keys": 16,
    "metadata_value_chars": 512,
    "list_page_size": 100,
}


def capabilities() -> dict[str, Any]:
    return {
        "object": "capabilities",
        "methods": list(METHODS),
        "patterns": list(PATTERNS),
        "allocations": list(ALLOCATIONS),
        "restorations": list(RESTORATIONS),
        "model_families": list(MODEL_FAMILIES),
        "model_schemes": [f"{s}:" for s in MODEL_SCHEMES],
        "datasets": [{"id": k, "kind": v} for k, v in BUILTIN_DATASETS.items()],
        "limits": LIMITS,
    }
