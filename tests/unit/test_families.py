"""Every supported model family prunes end to end through pipeline.run on its tiny seeded model."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers.pytorch_utils import Conv1D

from workers.pruning.methods import METHODS, Method
from workers.pruning.models import block_linears, find_towers, load_model, prunable_layers, weight_matrix
from workers.pruning.pipeline import run
from workers.pruning.sequential import Feed, Pruning, prune_sequential
from workers.pruning.spec import CalibrationSpec, EvaluationSpec, PruneSpec

LANGUAGE_MODELS = ("llama", "mistral", "qwen2", "gpt2", "opt")
VISION_LANGUAGE = ("clip", "llava", "blip-2")
# The Auto class a user would load the saved folder with.
AUTO_CLASS = {"clip": "AutoModel", "llava": "AutoModelForImageTextToText", "blip-2": "AutoModelForImageTextToText"}
EXPECTED_TOWERS = {"clip": ["vision", "language"], "llava": ["vision", "language"],
                   "blip-2": ["vision", "qformer", "language"]}


def spec_for(model_dir: Path, dataset: Path, **overrides: Any) -> PruneSpec:
    fields: dict[str, Any] = {
        "model_dir": model_dir, "method": "wanda", "sparsity": 0.5,
        "calibration": CalibrationSpec(dataset=str(dataset), num_samples=4, seq_len=32),
        "evaluation": EvaluationSpec(num_samples=2, seq_len=32),
    }
    return PruneSpec(**{**fields, **overrides})


def assert_rows_lose_floor_s_in(weight: torch.Tensor, sparsity: float, name: str) -> None:
    zeros_per_row = (weight == 0).sum(dim=1)
    expected = math.floor(sparsity * weight.shape[1] + 1e-9)
    assert (zeros_per_row == expected).all(), (name, zeros_per_row.tolist(), expected)


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
@pytest.mark.parametrize("family", LANGUAGE_MODELS + VISION_LANGUAGE)
def test_every_family_prunes_end_to_end(family: str, method: str, tiny_model: Callable[[str], Path],
                                        small_text: Path, tmp_path: Path) -> None:
    source = tiny_model(family)
    out = tmp_path / "out"
    result = run(spec_for(source, small_text, method=method), out)

    dense = load_model(source).model
    pruned = load_model(out).model
    assert type(pruned) is type(dense)
    towers = [t.name for t in find_towers(dense)]
    assert towers == EXPECTED_TOWERS.get(family, ["language"])

    # Pruned: every layer in the blocks of the default towers (qformer excluded), floor(s * in) zeros per row.
    expected_pruned = prunable_layers(dense, ("vision", "language"))
    layers = prunable_layers(pruned)
    for name, layer in layers.items():
        if name in expected_pruned:
            assert_rows_lose_floor_s_in(weight_matrix(layer), 0.5, name)
    # Dense: everything else, bit for bit (embeddings, heads, norms, biases, projector, Q-Former).
    dense_params = dict(dense.named_parameters())
    for name, param in pruned.named_parameters():
        if name.removesuffix(".weight") not in expected_pruned:
            assert torch.equal(param, dense_params[name]), name

    sparsity = result.metrics["sparsity"]
    assert set(sparsity["per_layer"]) == set(expected_pruned)
    assert set(sparsity["per_tower"]) == set(towers)
    assert sparsity["targets"] == {t: 0.5 for t in towers if t != "qformer"}
    assert sparsity["target"] == 0.5 and 0.5 - 1 / 64 < sparsity["achieved"] <= 0.5
    assert all(0.5 - 1 / 64 < sparsity["per_tower"][t] <= 0.5 for t in sparsity["targets"])
    if "qformer" in towers:
        assert sparsity["per_tower"]["qformer"] == 0.0
    report = json.loads(json.dumps(result.report))
    assert report["model"]["family"] == (family if family in VISION_LANGUAGE else "causal-lm")
    if family == "clip":
        assert "perplexity" not in result.metrics and "perplexity_skipped" in report["data"]
        # Zero-shot accuracy instead; a text dataset calibrates the vision tower on synthetic images.
        assert set(report["accuracy"]) == {"dense", "pruned"}
        assert report["data"].get("images") == ("synthetic" if method == "wanda" else None)  # magnitude: no data
    else:
        assert set(result.metrics["perplexity"]) == {"dense", "pruned"}
        assert all(math.isfinite(v) for v in result.metrics["perplexity"].values())


@pytest.mark.parametrize("family", VISION_LANGUAGE)
def test_saved_vision_language_folder_reloads_with_its_auto_class(family: str, tiny_model: Callable[[str], Path],
                                                                   small_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(spec_for(tiny_model(family), small_text, method="magnitude",
                 evaluation=EvaluationSpec(perplexity=False)), out)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    auto = getattr(transformers, AUTO_CLASS[family])
    reloaded = auto.from_pretrained(out)
    assert type(reloaded) is type(load_model(tiny_model(family)).model)
    assert transformers.AutoImageProcessor.from_pretrained(out) is not None


def test_conv1d_methods_see_out_by_in_weights_and_write_back_transposed(tiny_model: Callable[[str], Path]) -> None:
    """GPT-2 stores Conv1D weights as [in, out]; methods must get [out, in] and rows must mean outputs."""
    model = load_model(tiny_model("gpt2")).model
    tower = find_towers(model)[0]
    seen: list[tuple[int, ...]] = []

    def spy(weight: torch.Tensor, _stats: Any, sparsity: float, pattern: str) -> torch.Tensor:
        seen.append(tuple(weight.shape))
        return METHODS["magnitude"].prune(weight, None, sparsity, pattern)

    prune_sequential(model, tower.blocks, Pruning(Method("spy", None, spy), 0.5), Feed(None))
    convs = [layer for block in tower.blocks for layer in block_linears(block).values()]
    assert convs and all(isinstance(layer, Conv1D) for layer in convs)
    assert seen == [(layer.nf, layer.weight.shape[0]) for layer in convs]
    for layer in convs:
        # Per output (a column of the stored [in, out] weight): floor(0.5 * in) zeros.
        assert ((layer.weight == 0).sum(dim=0) == layer.weight.shape[0] // 2).all()


@pytest.mark.skipif("sparsegpt" not in METHODS, reason="sparsegpt is not registered")
def test_sparsegpt_prunes_gpt2_conv1d_through_the_view(tiny_model: Callable[[str], Path], small_text: Path,
                                                        tmp_path: Path) -> None:
    run(spec_for(tiny_model("gpt2"), small_text, method="sparsegpt",
                 evaluation=EvaluationSpec(perplexity=False)), tmp_path / "out")
    pruned = prunable_layers(load_model(tmp_path / "out").model)
    assert len(pruned) == 2 * 4
    for name, layer in pruned.items():
        assert isinstance(layer, Conv1D)
        assert_rows_lose_floor_s_in(weight_matrix(layer), 0.5, name)
