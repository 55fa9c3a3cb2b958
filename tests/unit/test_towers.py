"""Towers: discovery, per-tower targets, each tower's own calibration inputs, offloading, and the API field."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from app.errors import _loc_to_param
from app.schemas import JobCreate
from tests.unit.conftest import tiny_llama_from_config
from workers.pruning import multimodal
from workers.pruning.methods import get_method
from workers.pruning.models import find_towers, load_model, plan_towers, prunable_layers, tower_of
from workers.pruning.pipeline import run
from workers.pruning.sequential import (
    Feed,
    ModelInputs,
    Pruning,
    capture_block_inputs,
    prune_sequential,
    prune_towers,
)
from workers.pruning.spec import CalibrationSpec, EvaluationSpec, JobError, PruneSpec

NO_PPL = EvaluationSpec(perplexity=False)


def spec_for(model_dir: Path, dataset: Path, **overrides: Any) -> PruneSpec:
    fields: dict[str, Any] = {
        "model_dir": model_dir, "method": "wanda", "sparsity": 0.5,
        "calibration": CalibrationSpec(dataset=str(dataset), num_samples=4, seq_len=32), "evaluation": NO_PPL,
    }
    return PruneSpec(**{**fields, **overrides})


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    """Parameters by module name (a checkpoint's own key names can differ, e.g. LLaVA's legacy layout)."""
    return {name: p.detach() for name, p in load_model(folder).model.named_parameters()}


def zeros_per_row_ok(weight: torch.Tensor, sparsity: float) -> bool:
    """floor(s * in) or one more per row, and round(s * rows * in) over the layer (patterns.layer_prune_count)."""
    zeros = (weight == 0).sum(dim=1)
    floor = math.floor(sparsity * weight.shape[1] + 1e-9)
    return bool(((zeros == floor) | (zeros == floor + 1)).all()) and \
        int(zeros.sum()) == math.floor(sparsity * weight.numel() + 0.5)


# --- discovery -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "tower"), [
    ("vision_model.encoder.layers", "vision"), ("model.vision_tower.encoder.layers", "vision"),
    ("qformer.encoder.layer", "qformer"), ("text_model.encoder.layers", "language"),
    ("model.language_model.layers", "language"), ("transformer.h", "language"), ("model.layers", "language"),
])
def test_tower_of_a_module_path(path: str, tower: str) -> None:
    assert tower_of(path) == tower


def test_towers_of_the_vision_language_families(tiny_model: Callable[[str], Path]) -> None:
    prefixes = {family: [(t.name, t.prefix) for t in find_towers(load_model(tiny_model(family)).model)]
                for family in ("clip", "llava", "blip-2")}
    assert prefixes == {
        "clip": [("vision", "vision_model.encoder.layers"), ("language", "text_model.encoder.layers")],
        "llava": [("vision", "model.vision_tower.encoder.layers"), ("language", "model.language_model.layers")],
        "blip-2": [("vision", "vision_model.encoder.layers"), ("qformer", "qformer.encoder.layer"),
                   ("language", "language_model.model.decoder.layers")],
    }


def test_plan_defaults_and_targets() -> None:
    towers = find_towers(tiny_llama_from_config())
    assert [(t.name, s) for t, s in plan_towers(towers, 0.4)] == [("language", 0.4)]
    assert [(t.name, s) for t, s in plan_towers(towers, 0.4, {"language": 0.7})] == [("language", 0.7)]
    with pytest.raises(JobError) as info:
        plan_towers(towers, 0.5, {"vision": 0.5})
    assert info.value.code == "invalid_spec" and "'vision'" in info.value.message


# --- each tower's own calibration inputs ---------------------------------------------------------------


def calibration(model: torch.nn.Module, n: int = 3, seq_len: int = 12) -> ModelInputs:
    return multimodal.calibration_inputs(model, multimodal.synthetic_token_windows(model, n, seq_len, 0),
                                         multimodal.synthetic_pixels(model, n, 0))


def test_llava_language_blocks_receive_merged_image_and_text(tiny_model: Callable[[str], Path]) -> None:
    model = load_model(tiny_model("llava")).model
    inputs = calibration(model)
    image_tokens = (inputs.tensors["input_ids"] == model.config.image_token_id).sum(dim=1)
    assert image_tokens.tolist() == [16, 16, 16]  # (32 / 8)^2 patches, CLS dropped ("default" strategy)
    language = find_towers(model)[1]
    with torch.inference_mode():
        hidden, _ = capture_block_inputs(model, language.blocks[0], inputs, batch_size=2)
        image = torch.stack(list(model.model.get_image_features(inputs.tensors["pixel_values"]).pooler_output))
        text = model.get_input_embeddings()(inputs.tensors["input_ids"][:, 16:])
    assert hidden.shape == (3, 16 + 12, 64)
    assert torch.allclose(hidden[:, :16], image) and torch.equal(hidden[:, 16:], text)


def test_blip2_language_blocks_receive_the_qformer_outputs(tiny_model: Callable[[str], Path]) -> None:
    model = load_model(tiny_model("blip-2")).model
    inputs = calibration(model)
    language = find_towers(model)[2]
    with torch.inference_mode():
        hidden, _ = capture_block_inputs(model, language.blocks[0], inputs, batch_size=3)
        # The same first-block inputs, made by the inner LM from [projected queries, text embeddings].
        queries = model.get_image_features(inputs.tensors["pixel_values"]).pooler_output
        text = model.get_input_embeddings()(inputs.tensors["input_ids"][:, 8:])
        merged = ModelInputs({"inputs_embeds": torch.cat([queries, text], dim=1),
                              "attention_mask": inputs.tensors["attention_mask"]}, {"use_cache": False})
        expected, _ = capture_block_inputs(model.language_model, language.blocks[0], merged, batch_size=3)
    assert hidden.shape[:2] == (3, 8 + 12) and torch.allclose(hidden, expected)


def test_clip_vision_blocks_receive_patch_embeddings(tiny_model: Callable[[str], Path]) -> None:
    model = load_model(tiny_model("clip")).model
    inputs = calibration(model)
    with torch.inference_mode():
        hidden, _ = capture_block_inputs(model, find_towers(model)[0].blocks[0], inputs, batch_size=3)
        expected = model.vision_model.pre_layrnorm(model.vision_model.embeddings(inputs.tensors["pixel_values"]))
    assert hidden.shape == (3, 1 + 16, 64) and torch.equal(hidden, expected)


def test_clip_text_windows_fit_its_context(tiny_model: Callable[[str], Path]) -> None:
    clip = load_model(tiny_model("clip")).model
    assert multimodal.text_length(clip, 512) == 77 and multimodal.text_length(clip, 32) == 32
    assert multimodal.text_length(tiny_llama_from_config(), 512) == 512


def test_synthetic_images_are_seeded() -> None:
    first, again = multimodal.synthetic_images(2, 32, seed=0), multimodal.synthetic_images(2, 32, seed=0)
    assert first.shape == (2, 3, 32, 32) and torch.equal(first, again)
    assert not torch.equal(first, multimodal.synthetic_images(2, 32, seed=1))


# --- targets -------------------------------------------------------------------------------------------


def test_language_only_llava_leaves_the_vision_tower_bit_identical(tiny_model: Callable[[str], Path],
                                                                    small_text: Path, tmp_path: Path) -> None:
    source = tiny_model("llava")
    result = run(spec_for(source, small_text, targets={"language": 0.7}), tmp_path / "out")
    before, after = weights_of(source), weights_of(tmp_path / "out")
    language = set(prunable_layers(load_model(source).model, ("language",)))
    for name, weight in after.items():
        if name.removesuffix(".weight") in language:
            assert zeros_per_row_ok(weight, 0.7), name
        else:
            assert torch.equal(weight, before[name]), name  # vision tower, projector, embeddings, head
    sparsity = result.metrics["sparsity"]
    assert sparsity["targets"] == {"language": 0.7} and sparsity["target"] == 0.7
    assert sparsity["per_tower"]["vision"] == 0.0 and sparsity["per_tower"]["language"] == pytest.approx(0.7, abs=1e-3)
    assert set(sparsity["per_layer"]) == language


def test_each_tower_gets_its_own_sparsity(tiny_model: Callable[[str], Path], small_text: Path,
                                          tmp_path: Path) -> None:
    source = tiny_model("clip")
    result = run(spec_for(source, small_text, method="magnitude", targets={"vision": 0.3, "language": 0.6}),
                 tmp_path / "out")
    after = weights_of(tmp_path / "out")
    for tower, sparsity in (("vision", 0.3), ("language", 0.6)):
        for name in prunable_layers(load_model(source).model, (tower,)):
            assert zeros_per_row_ok(after[f"{name}.weight"], sparsity), name
    per_tower = result.metrics["sparsity"]["per_tower"]
    # round(s * size) zeros per layer: each tower within half a weight per layer of its target
    assert per_tower["vision"] == pytest.approx(0.3, abs=1e-3) and per_tower["language"] == pytest.approx(0.6, abs=1e-3)
    assert 0.3 < result.metrics["sparsity"]["target"] < 0.6  # weighted by the towers' pruned weights


def test_blip2_qformer_is_dense_unless_named(tiny_model: Callable[[str], Path], small_text: Path,
                                             tmp_path: Path) -> None:
    source = tiny_model("blip-2")
    qformer = set(prunable_layers(load_model(source).model, ("qformer",)))
    run(spec_for(source, small_text, method="magnitude"), tmp_path / "default")
    before, default = weights_of(source), weights_of(tmp_path / "default")
    assert all(torch.equal(default[f"{n}.weight"], before[f"{n}.weight"]) for n in qformer)

    result = run(spec_for(source, small_text, method="magnitude", targets={"qformer": 0.5}), tmp_path / "named")
    named = weights_of(tmp_path / "named")
    assert all(zeros_per_row_ok(named[f"{n}.weight"], 0.5) for n in qformer)
    assert result.metrics["sparsity"]["per_tower"]["vision"] == 0.0


class _Block(nn.Module):
    """A block with a layer its forward never calls, like BLIP-2 Q-Former text sublayers with image queries."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.used(hidden)


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            inputs_embeds = layer(inputs_embeds)
        return inputs_embeds


def test_layers_calibration_never_reaches_stay_dense_and_are_reported() -> None:
    torch.manual_seed(0)
    model = _Stack()
    unused_before = [block.unused.weight.clone() for block in model.layers]
    inputs = ModelInputs({"inputs_embeds": torch.randn(4, 5, 8)})
    unused = prune_sequential(model, model.layers, Pruning(get_method("wanda"), 0.5), Feed(inputs, 2))
    assert unused == ["0.unused", "1.unused"]
    for block, before in zip(model.layers, unused_before, strict=True):
        assert torch.equal(block.unused.weight, before) and zeros_per_row_ok(block.used.weight, 0.5)


def test_blip2_qformer_with_wanda_prunes_every_query_layer(tiny_model: Callable[[str], Path], small_text: Path,
                                                           tmp_path: Path) -> None:
    result = run(spec_for(tiny_model("blip-2"), small_text, targets={"qformer": 0.5}), tmp_path / "out")
    assert result.report["unused_layers"] == []  # this transformers builds no Q-Former text sublayers by default
    assert result.metrics["sparsity"]["achieved"] == 0.5
    assert result.metrics["sparsity"]["per_tower"] == {"vision": 0.0, "qformer": 0.5, "language": 0.0}


@pytest.mark.parametrize(("targets", "code"), [({"audio": 0.5}, "invalid_spec"), ({"language": 1.0}, "invalid_spec"),
                                               ({"vision": 0.5}, "invalid_spec")])
def test_bad_targets_fail_readably(targets: dict[str, float], code: str, tiny_llama_dir: Path, small_text: Path,
                                   tmp_path: Path) -> None:
    with pytest.raises(JobError) as info:
        run(spec_for(tiny_llama_dir, small_text, targets=targets), tmp_path / "out")
    assert info.value.code == code and next(iter(targets)) in info.value.message


def test_vision_only_job_needs_no_tokenizer(tiny_model: Callable[[str], Path], small_text: Path,
                                            tmp_path: Path) -> None:
    folder = tmp_path / "clip-no-tokenizer"
    shutil.copytree(tiny_model("clip"), folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    assert load_model(folder).tokenizer is None
    result = run(spec_for(folder, small_text, targets={"vision": 0.5}), tmp_path / "out")
    assert result.metrics["sparsity"]["per_tower"] == {"vision": 0.5, "language": 0.0}
    with pytest.raises(JobError) as info:
        run(spec_for(folder, small_text, targets={"language": 0.5}), tmp_path / "out2")
    assert info.value.code == "invalid_model" and "tokenizer" in info.value.message


# --- offloading ----------------------------------------------------------------------------------------


def test_offload_gives_bit_identical_results(tiny_model: Callable[[str], Path], small_text: Path,
                                             tmp_path: Path) -> None:
    source = tiny_model("llava")
    in_place = run(spec_for(source, small_text), tmp_path / "in-place")
    offloaded = run(spec_for(source, small_text, offload=True), tmp_path / "offloaded")
    first, second = weights_of(tmp_path / "in-place"), weights_of(tmp_path / "offloaded")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert in_place.metrics["sparsity"] == offloaded.metrics["sparsity"]


def test_offload_keeps_the_model_on_its_home_device_and_weights_trainable() -> None:
    model = tiny_llama_from_config()
    reference = tiny_llama_from_config()
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    plan = [(find_towers(model)[0], 0.5)]
    prune_towers(model, plan, get_method("wanda"), "unstructured", windows, 2, device=torch.device("cpu"))
    prune_towers(reference, [(find_towers(reference)[0], 0.5)], get_method("wanda"), "unstructured", windows, 2)
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(ours, theirs) and ours.device.type == "cpu" and not ours.is_inference(), name


# --- the API field -------------------------------------------------------------------------------------


def job(**fields: Any) -> dict[str, Any]:
    return {"model": "local:tiny-llava", "method": "wanda", "sparsity": 0.5, **fields}


def test_api_accepts_per_tower_targets() -> None:
    assert JobCreate.model_validate(job(targets={"vision": 0.5, "language": 0.5})).targets == {
        "vision": 0.5, "language": 0.5}
    assert JobCreate.model_validate(job(targets={"language": 0.7})).targets == {"language": 0.7}
    assert JobCreate.model_validate(job()).targets is None


@pytest.mark.parametrize(("targets", "pattern"), [
    ({"audio": 0.5}, "unstructured"), ({"vision": 1.0}, "unstructured"), ({"language": 0.0}, "unstructured"),
    ({"vision": -0.2}, "unstructured"), ({}, "unstructured"), ({"language": 0.7}, "2:4"),
])
def test_api_refuses_bad_targets_naming_the_field(targets: dict[str, float], pattern: str) -> None:
    with pytest.raises(ValidationError) as info:
        JobCreate.model_validate(job(targets=targets, pattern=pattern))
    errors = info.value.errors()
    assert len(errors) == 1 and _loc_to_param(("body", *errors[0]["loc"])) == "targets"


def test_api_accepts_restore_with_defaults_filled_in() -> None:
    body = JobCreate.model_validate(job(restore={"method": "sparse-lora", "steps": 50, "warmup_steps": 0.2,
                                                 "targets": ["q_proj", "mlp.fc1"]}))
    assert body.restore is not None
    assert body.model_dump(mode="json")["restore"] == {
        "method": "sparse-lora", "steps": 50, "rank": 8, "alpha": 16.0, "lr": 1e-4, "distill": 0.1, "batch_size": 4,
        "warmup_steps": 0.2, "dataset": None, "targets": ["q_proj", "mlp.fc1"]}
    assert JobCreate.model_validate(job(restore={"method": "lora"})).restore.method == "lora"  # type: ignore[union-attr]
    assert JobCreate.model_validate(job()).restore is None


@pytest.mark.parametrize(("restore", "param"), [
    ({"rank": 0}, "restore.rank"), ({"rank": 257}, "restore.rank"), ({"steps": 0}, "restore.steps"),
    ({"steps": 100_001}, "restore.steps"), ({"alpha": 0}, "restore.alpha"), ({"lr": 0}, "restore.lr"),
    ({"lr": 2}, "restore.lr"), ({"distill": -0.1}, "restore.distill"), ({"distill": 1.5}, "restore.distill"),
    ({"batch_size": 0}, "restore.batch_size"), ({"batch_size": 257}, "restore.batch_size"),
    ({"warmup_steps": 2.5}, "restore.warmup_steps"), ({"warmup_steps": -1}, "restore.warmup_steps"),
    ({"method": "qlora"}, "restore.method"), ({"dataset": "builtin:nope"}, "restore.dataset"),
    ({"targets": []}, "restore.targets"), ({"targets": ["a b"]}, "restore.targets"), ({"seed": 1}, "restore.seed"),
])
def test_api_refuses_bad_restore_options_naming_the_field(restore: dict[str, object], param: str) -> None:
    with pytest.raises(ValidationError) as info:
        JobCreate.model_validate(job(restore=restore))
    errors = info.value.errors()
    assert len(errors) == 1 and _loc_to_param(("body", *errors[0]["loc"])) == param


def test_api_refuses_restore_with_offload() -> None:
    with pytest.raises(ValidationError) as info:
        JobCreate.model_validate(job(restore={}, offload=True))
    assert _loc_to_param(("body", *info.value.errors()[0]["loc"])) == "restore"


def test_runner_passes_restore_to_the_engine(tmp_path: Path) -> None:
    from prunekit.core.config import Settings
    from workers.job_spec import build_spec
    from workers.pruning.spec import RestoreSpec

    body = JobCreate.model_validate(job(restore={"steps": 20, "rank": 4, "targets": ["q_proj"], "warmup_steps": 0.1}))
    spec = build_spec(body.model_dump(mode="json"), tmp_path, Settings(PRUNEKIT_VAR_DIR=tmp_path))
    assert spec.restore == RestoreSpec(steps=20, rank=4, targets=("q_proj",), warmup_steps=0.1)
    assert build_spec(JobCreate.model_validate(job()).model_dump(mode="json"), tmp_path,
                      Settings(PRUNEKIT_VAR_DIR=tmp_path)).restore is None


def test_runner_passes_targets_to_the_engine(tmp_path: Path) -> None:
    from prunekit.core.config import Settings
    from workers.job_spec import build_spec

    request = job(targets={"language": 0.5})
    spec = build_spec(request, tmp_path, Settings(PRUNEKIT_VAR_DIR=tmp_path))
    assert spec.targets == {"language": 0.5}


def test_runner_passes_offload_allocation_and_sweep_to_the_engine(tmp_path: Path) -> None:
    from prunekit.core.config import Settings
    from workers.job_spec import build_spec

    body = JobCreate.model_validate(job(offload=True, allocation="owl", allocation_options={"spread": 0.05},
                                        sweep={"sparsities": [0.7, 0.5]}))
    spec = build_spec(body.model_dump(mode="json"), tmp_path, Settings(PRUNEKIT_VAR_DIR=tmp_path))
    assert spec.offload == "cpu" and spec.sweep == (0.5, 0.7)
    assert spec.allocation.name == "owl" and spec.allocation.spread == 0.05
    assert spec.allocation.granularity == "block" and spec.allocation.num_samples == 8
