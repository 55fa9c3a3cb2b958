"""Restoration (SparseLoRA): the masked adapter, its gradients and merge, the schedule, the losses, the loop on
tiny Llama / GPT-2 / CLIP / LLaVA / BLIP-2, and the pipeline's restoring stage."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from transformers import AutoModelForCausalLM

from tests.unit.conftest import tiny_llama_from_config
from tests.unit.test_pipeline import spec_for
from workers.pruning import restore
from workers.pruning.methods import get_method
from workers.pruning.models import find_towers, load_model, plan_towers, save_pretrained_folder, tower_layers
from workers.pruning.pipeline import run
from workers.pruning.restore import lora
from workers.pruning.restore.batches import CAUSAL_LM, Batch, TrainingData, training_data
from workers.pruning.restore.losses import IGNORE_INDEX, causal_lm_loss, contrastive_loss, kl_teacher_student
from workers.pruning.restore.schedule import lr_factor, warmup_count
from workers.pruning.restore.train import train
from workers.pruning.sequential import prune_towers
from workers.pruning.spec import (
    STAGES,
    CalibrationSpec,
    EvaluationSpec,
    JobCancelled,
    JobError,
    Progress,
    PruneSpec,
    RestoreSpec,
)


def _prune(model: nn.Module, sparsity: float = 0.5) -> dict[str, nn.Module]:
    """Magnitude-prunes every tower (no data needed); returns the pruned layers by full name."""
    plan = plan_towers(find_towers(model), sparsity)
    prune_towers(model, plan, get_method("magnitude"), "unstructured", None)
    return {name: layer for tower, _ in plan for name, layer in tower_layers(tower).items()}


def _zeros(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {name: (layer.weight.detach() == 0).clone() for name, layer in layers.items()}


def _bits_at_zeros(layers: dict[str, nn.Module], zeros: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The raw bit patterns of the pruned entries: +0.0 must stay +0.0 (and -0.0, -0.0)."""
    return {name: layers[name].weight.detach()[zeros[name]].view(torch.int32).clone() for name in layers}


def _repeating(model: nn.Module, batches: list[torch.Tensor]) -> TrainingData:
    """A few fixed token batches, repeated: a loss that can only fall if training works."""
    def batch(step: int) -> Batch:
        ids = batches[step % len(batches)]
        return Batch({"input_ids": ids, "use_cache": False}, labels=ids)
    return TrainingData(CAUSAL_LM, model, batch)


def _token_batches(count: int = 3, size: int = 4, seq_len: int = 24, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (size, seq_len), generator=generator) for _ in range(count)]


# --- the schedule -----------------------------------------------------------------------------------------


def test_warmup_is_a_count_or_a_fraction_of_the_steps() -> None:
    assert warmup_count(10, 200) == 10
    assert warmup_count(0.1, 200) == 20
    assert warmup_count(0, 200) == 0
    assert warmup_count(500, 200) == 200


def test_schedule_warms_up_linearly_then_decays_as_a_cosine_by_hand() -> None:
    steps, warmup = 10, 4
    factors = [lr_factor(step, steps, warmup) for step in range(steps)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    # cosine over the remaining 6 steps: 0.5 * (1 + cos(pi * k / 6)), k = 0..5
    expected = [0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
    assert factors[4:] == pytest.approx(expected, abs=1e-12)
    assert factors[4] == 1.0 and factors[7] == pytest.approx(0.5) and 0 < factors[-1] < 0.07
    assert lr_factor(0, 5, 0) == 1.0  # no warm-up: the first update is at the peak


def test_the_optimizer_sees_the_scheduled_learning_rate() -> None:
    weight = nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, 6, 2))
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.1 * lr_factor(step, 6, 2) for step in range(6)])


# --- the masked adapter -----------------------------------------------------------------------------------


def _pruned_linear(out: int = 6, inp: int = 8, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(inp, out, bias=False)
    with torch.no_grad():
        layer.weight[layer.weight.abs() < layer.weight.abs().median()] = 0.0
    layer.weight.requires_grad_(False)
    return layer


def test_b_starts_at_zero_so_training_starts_from_the_pruned_weight() -> None:
    layer = _pruned_linear()
    pruned = layer.weight.detach().clone()
    attached = lora.attach({"l": layer}, {"l"}, rank=2, alpha=4, masked=True, seed=0)
    adapter = attached["l"]
    assert adapter.A is not None and adapter.B is not None
    assert adapter.A.shape == (2, 8) and adapter.B.shape == (6, 2) and not adapter.B.any()
    assert torch.equal(layer.weight, pruned)
    # A is seeded: the same seed draws the same adapters.
    again = lora.attach({"l": _pruned_linear()}, {"l"}, rank=2, alpha=4, masked=True, seed=0)["l"]
    assert again.A is not None and torch.equal(adapter.A, again.A)


def test_effective_weight_is_masked_and_gradients_reaching_a_and_b_are_masked() -> None:
    layer = _pruned_linear()
    pruned = layer.weight.detach().clone()
    mask = pruned != 0
    adapter = lora.attach({"l": layer}, {"l"}, rank=2, alpha=4, masked=True, seed=0)["l"]
    assert adapter.A is not None and adapter.B is not None
    with torch.no_grad():
        adapter.B.normal_()
    scale = 4 / 2
    expected = torch.where(mask, pruned + scale * adapter.B @ adapter.A, pruned)
    assert torch.allclose(layer.weight, expected, atol=1e-6)
    assert torch.equal(layer.weight[~mask], pruned[~mask])

    x = torch.randn(5, 8)
    upstream = torch.randn(5, 6)
    (layer(x) * upstream).sum().backward()
    grad_weight = upstream.T @ x  # dL/dW_eff of y = x W^T
    masked = grad_weight * mask
    assert torch.allclose(adapter.B.grad, scale * masked @ adapter.A.detach().T, atol=1e-5)
    assert torch.allclose(adapter.A.grad, scale * adapter.B.detach().T @ masked, atol=1e-5)


def test_a_fully_pruned_layer_passes_no_gradient_to_its_adapter_and_at_init_a_gets_none() -> None:
    layer = nn.Linear(8, 6, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
    adapter = lora.attach({"l": layer}, {"l"}, rank=2, alpha=4, masked=True, seed=0)["l"]
    assert adapter.A is not None and adapter.B is not None
    with torch.no_grad():
        adapter.B.normal_()
    layer(torch.randn(3, 8)).sum().backward()
    assert not adapter.A.grad.any() and not adapter.B.grad.any()

    fresh = _pruned_linear()
    adapter = lora.attach({"l": fresh}, {"l"}, rank=2, alpha=4, masked=True, seed=0)["l"]
    assert adapter.A is not None and adapter.B is not None
    fresh(torch.randn(3, 8)).sum().backward()
    assert not adapter.A.grad.any() and adapter.B.grad.any()  # B = 0: nothing reaches A at the first step


def test_conv1d_weights_stored_in_by_out_get_the_transposed_update() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(6, 8)  # nf = out, nx = in; weight [8, 6]
    with torch.no_grad():
        layer.weight[layer.weight.abs() < layer.weight.abs().median()] = 0.0
    pruned = layer.weight.detach().clone()
    adapter = lora.attach({"c": layer}, {"c"}, rank=2, alpha=2, masked=True, seed=0)["c"]
    assert adapter.A is not None and adapter.B is not None
    assert adapter.A.shape == (2, 8) and adapter.B.shape == (6, 2)  # A: rank x in, B: out x rank
    with torch.no_grad():
        adapter.B.normal_()
    expected = torch.where(pruned != 0, pruned + (adapter.B @ adapter.A).T, pruned)
    assert torch.allclose(layer.weight, expected, atol=1e-6)


# --- the losses -------------------------------------------------------------------------------------------


def test_kl_is_zero_against_itself_and_matches_its_definition() -> None:
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    assert float(kl_teacher_student(student, student)) == pytest.approx(0.0, abs=1e-6)
    p = teacher.softmax(-1)
    by_hand = (p * (p.log() - student.log_softmax(-1))).sum(-1).mean()
    assert float(kl_teacher_student(student, teacher)) == pytest.approx(float(by_hand), rel=1e-5)


def test_language_model_loss_skips_ignored_labels_and_mixes_in_the_kl() -> None:
    logits, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[:, :3] = IGNORE_INDEX  # e.g. image placeholders: positions 0..1 predict nothing
    loss = causal_lm_loss(logits, teacher, labels, distill=0.25)
    valid = labels[:, 1:] != IGNORE_INDEX  # position t is scored on label t + 1
    rows = logits[:, :-1][valid]
    ce = F.cross_entropy(rows, labels[:, 1:][valid])
    kl = kl_teacher_student(rows, teacher[:, :-1][valid])
    assert loss.task == pytest.approx(float(ce)) and loss.distill == pytest.approx(float(kl))
    assert float(loss.total) == pytest.approx(float(0.75 * ce + 0.25 * kl))
    assert causal_lm_loss(logits, None, labels, 0.0).distill == 0.0


def test_contrastive_loss_is_symmetric_and_needs_two_pairs() -> None:
    logits = torch.randn(4, 4)
    target = torch.arange(4)
    loss = contrastive_loss(logits, logits, distill=0.5)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert loss.task == pytest.approx(float(expected)) and loss.distill == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        contrastive_loss(torch.randn(1, 1), None, 0.0)


# --- the loop on real models ------------------------------------------------------------------------------


def _restore_llama(method: str, steps: int = 30, lr: float = 1e-2, distill: float = 0.0,
                   **kwargs: object) -> tuple[nn.Module, dict[str, nn.Module], dict[str, object]]:
    model = tiny_llama_from_config()
    dense = lora.dense_copies({name: layer for tower in find_towers(model)
                               for name, layer in tower_layers(tower).items()})
    layers = _prune(model)
    spec = RestoreSpec(method=method, steps=steps, rank=4, alpha=8, lr=lr, distill=distill, warmup_steps=2)
    facts = train(model, layers, set(layers), spec, _repeating(model, _token_batches()), seed=0, dense=dense,
                  **kwargs)  # type: ignore[arg-type]
    return model, layers, facts


def test_sparse_lora_on_llama_keeps_the_pruned_zeros_bit_for_bit_while_the_loss_falls() -> None:
    model = tiny_llama_from_config()
    dense = lora.dense_copies({name: layer for tower in find_towers(model)
                               for name, layer in tower_layers(tower).items()})
    layers = _prune(model)
    zeros = _zeros(layers)
    bits = _bits_at_zeros(layers, zeros)
    before = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    spec = RestoreSpec(steps=30, rank=4, alpha=8, lr=1e-2, distill=0.1, warmup_steps=3)
    facts = train(model, layers, set(layers), spec, _repeating(model, _token_batches()), seed=0, dense=dense)

    assert facts["mask_preserved"] is True
    assert _zeros(layers).keys() == zeros.keys()
    for name, layer in layers.items():
        assert not parametrize.is_parametrized(layer)
        assert torch.equal(layer.weight == 0, zeros[name]), name
        assert torch.equal(layer.weight.detach()[zeros[name]].view(torch.int32), bits[name]), name
    assert any(not torch.equal(layers[n].weight, before[n]) for n in layers)  # the kept weights did move
    losses = facts["losses"]
    assert isinstance(losses, list) and len(losses) == 30 and facts["loss_first"] == losses[0]
    assert sum(losses[-3:]) / 3 < 0.95 * sum(losses[:3]) / 3, losses
    assert facts["trainable_parameters"] == sum(4 * (layer.in_features + layer.out_features)
                                                for layer in layers.values())


def test_bf16_models_train_fp32_adapters_and_keep_their_zeros() -> None:
    """A GPU worker keeps a bf16 checkpoint in bf16: the update is computed in fp32 and rounded once."""
    model = tiny_llama_from_config().to(torch.bfloat16)
    dense = lora.dense_copies({name: layer for tower in find_towers(model)
                               for name, layer in tower_layers(tower).items()})
    layers = _prune(model)
    zeros = _zeros(layers)
    bits = {name: layers[name].weight.detach()[zeros[name]].view(torch.int16).clone() for name in layers}
    facts = train(model, layers, set(layers), RestoreSpec(steps=4, rank=2, lr=1e-2),
                  _repeating(model, _token_batches()), seed=0, dense=dense)
    assert facts["mask_preserved"] is True and math.isfinite(facts["loss_last"])
    for name, layer in layers.items():
        assert layer.weight.dtype == torch.bfloat16
        assert torch.equal(layer.weight.detach()[zeros[name]].view(torch.int16), bits[name]), name


def test_plain_lora_merge_fills_the_pruned_zeros_in_and_sparse_lora_does_not() -> None:
    _, plain_layers, plain = _restore_llama("lora", steps=5)
    _, sparse_layers, sparse = _restore_llama("sparse-lora", steps=5)
    assert plain["mask_preserved"] is False and sparse["mask_preserved"] is True

    def sparsity(layers: dict[str, nn.Module]) -> float:
        return sum(int((layer.weight == 0).sum()) for layer in layers.values()) / sum(
            layer.weight.numel() for layer in layers.values())

    assert sparsity(sparse_layers) == 0.5
    assert sparsity(plain_layers) < 0.01


def test_the_teacher_is_the_dense_model_and_distillation_pulls_towards_it() -> None:
    model = tiny_llama_from_config()
    ids = _token_batches(1)[0]
    with torch.no_grad():
        dense_logits = model(ids).logits
    dense = lora.dense_copies({name: layer for tower in find_towers(model)
                               for name, layer in tower_layers(tower).items()})
    layers = _prune(model)
    attached = lora.attach(layers, set(layers), 4, 8, True, 0, dense)
    with torch.no_grad(), lora.teacher_mode(attached):
        assert torch.equal(model(ids).logits, dense_logits)
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, dense_logits)  # outside: the pruned (adapted) model
    lora.detach(layers, attached)

    _, _, facts = _restore_llama("sparse-lora", steps=20, distill=1.0)
    assert facts["loss_last_task"] > 0 and facts["loss_last"] < facts["loss_first"]


def test_merged_folder_loads_with_plain_transformers_and_gives_the_adapted_logits(tiny_llama_dir: Path,
                                                                                  tmp_path: Path) -> None:
    loaded = load_model(tiny_llama_dir)
    model = loaded.model
    layers = _prune(model)
    zeros = _zeros(layers)
    attached = lora.attach(layers, set(layers), 4, 8, True, 0)
    with torch.no_grad():
        for adapter in attached.values():
            assert adapter.B is not None
            adapter.B.normal_(std=0.05)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(ids).logits
    assert all(lora.merge(layers, attached).values())
    save_pretrained_folder(model, loaded.tokenizer, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as saved:
        names = list(saved.keys())  # noqa: SIM118 (safe_open is not a dict)
    assert names and not [key for key in names if "parametrizations" in key or "lora" in key.lower()]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, adapted)
    modules = dict(plain.named_modules())
    for name, mask in zeros.items():
        assert torch.equal(modules[name].weight == 0, mask), name


def test_cancelling_between_steps_removes_the_adapters_and_keeps_the_pruned_weights() -> None:
    model = tiny_llama_from_config()
    layers = _prune(model)
    before = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    calls = iter(range(100))
    with pytest.raises(JobCancelled):
        train(model, layers, set(layers), RestoreSpec(steps=10, distill=0.0), _repeating(model, _token_batches()), 0,
              should_cancel=lambda: next(calls) >= 3)
    for name, layer in layers.items():
        assert not parametrize.is_parametrized(layer) and torch.equal(layer.weight, before[name])


def test_progress_reports_the_loss_at_most_fifty_times() -> None:
    steps: list[tuple[int, float]] = []
    _, _, facts = _restore_llama("sparse-lora", steps=120, lr=1e-3, on_step=lambda s, v: steps.append((s, v)))
    assert facts["loss_every"] == 3 and len(facts["losses"]) == 40 and len(steps) == 40
    assert steps[-1][0] == 120 and [v for _, v in steps] == pytest.approx(facts["losses"], abs=1e-6)


def test_targets_select_layers_by_whole_name_suffix() -> None:
    names = ["m.layers.0.self_attn.q_proj", "m.layers.0.mlp.up_proj", "m.layers.1.self_attn.q_proj"]
    assert restore.select_layers(names, None) == set(names)
    assert restore.select_layers(names, ("q_proj",)) == {names[0], names[2]}
    assert restore.select_layers(names, ("mlp.up_proj",)) == {names[1]}
    with pytest.raises(JobError, match="name none"):
        restore.select_layers(names, ("proj",))


@pytest.mark.parametrize(("options", "offload"), [
    ({"method": "qlora"}, False), ({"rank": 0}, False), ({"lr": 0.0}, False), ({"distill": 1.5}, False),
    ({"warmup_steps": 2.5}, False), ({"warmup_steps": -1}, False), ({}, True),
])
def test_engine_refuses_restore_options_the_api_would(options: dict[str, object], offload: bool) -> None:
    with pytest.raises(JobError) as info:
        restore.check(RestoreSpec(**options), offload)  # type: ignore[arg-type]
    assert info.value.code == "invalid_spec"


# --- vision-language families ------------------------------------------------------------------------------


def test_sparse_lora_on_clip_keeps_both_towers_masks_and_trains_contrastively(
        tiny_model: Callable[[str], Path]) -> None:
    loaded = load_model(tiny_model("clip"))
    model = loaded.model
    dense = lora.dense_copies({name: layer for tower in find_towers(model)
                               for name, layer in tower_layers(tower).items()})
    layers = _prune(model)
    assert {name.split(".")[0] for name in layers} == {"vision_model", "text_model"}
    zeros = _zeros(layers)
    bits = _bits_at_zeros(layers, zeros)
    events: list[Progress] = []
    facts = restore.restore_pruned(model, loaded.tokenizer, layers,
                                   RestoreSpec(steps=8, rank=4, lr=1e-3, batch_size=4, distill=0.5),
                                   CalibrationSpec(dataset="builtin:digits", seq_len=16), dense, events.append,
                                   lambda: False)
    assert facts["mask_preserved"] is True and facts["data"]["kind"] == "image-text"
    assert all(math.isfinite(value) for value in facts["losses"])
    for name, layer in layers.items():
        assert torch.equal(layer.weight == 0, zeros[name]), name
        assert torch.equal(layer.weight.detach()[zeros[name]].view(torch.int32), bits[name]), name
    assert [e.done for e in events] == list(range(1, 9)) and "loss" in events[-1].message


def test_clip_batches_never_repeat_a_caption_and_clip_needs_pairs(tiny_model: Callable[[str], Path]) -> None:
    loaded = load_model(tiny_model("clip"))
    data = training_data(loaded.model, loaded.tokenizer, "builtin:digits", 16, 16, seed=3)
    batch = data.batch(0)
    ids = batch.inputs["input_ids"]
    assert ids.shape[0] == 10 and len({tuple(row.tolist()) for row in ids}) == 10  # ten distinct digits
    with pytest.raises(JobError, match="two"):
        training_data(loaded.model, loaded.tokenizer, "builtin:digits", 1, 16, seed=3)
    with pytest.raises(JobError, match="image-caption"):
        training_data(loaded.model, loaded.tokenizer, "builtin:wiki-en", 4, 16, seed=3)


@pytest.mark.parametrize("family", ["llava", "blip-2"])
def test_llava_and_blip2_train_on_captions_ignoring_the_image_placeholders(
        tiny_model: Callable[[str], Path], small_text: Path, family: str) -> None:
    loaded = load_model(tiny_model(family))
    model = loaded.model
    text = training_data(model, loaded.tokenizer, str(small_text), 2, 32, seed=0)  # a text dataset: text alone
    assert text.model is (model.language_model if family == "blip-2" else model)
    assert set(text.batch(0).inputs) == {"input_ids", "use_cache"}
    data = training_data(model, loaded.tokenizer, "builtin:digits", 3, 16, seed=0)
    batch = data.batch(0)
    ids, labels = batch.inputs["input_ids"], batch.labels
    assert labels is not None and "pixel_values" in batch.inputs
    placeholders = ids == model.config.image_token_id
    assert placeholders.any() and (labels[placeholders] == IGNORE_INDEX).all()
    assert (labels[~placeholders & (batch.inputs["attention_mask"] == 1)] != IGNORE_INDEX).all()

    dense = lora.dense_copies({name: layer for tower in find_towers(model)
                               for name, layer in tower_layers(tower).items()})
    layers = _prune(model)
    zeros = _zeros(layers)
    facts = restore.restore_pruned(model, loaded.tokenizer, layers, RestoreSpec(steps=4, rank=2, batch_size=3),
                                   CalibrationSpec(dataset="builtin:digits", seq_len=16), dense,
                                   lambda _p: None, lambda: False)
    assert facts["mask_preserved"] is True and math.isfinite(facts["loss_last"])
    assert all(torch.equal(layer.weight == 0, zeros[name]) for name, layer in layers.items())


def test_gpt2_conv1d_layers_are_restored_exactly_sparse(tiny_model: Callable[[str], Path], small_text: Path) -> None:
    loaded = load_model(tiny_model("gpt2"))
    dense = lora.dense_copies({name: layer for tower in find_towers(loaded.model)
                               for name, layer in tower_layers(tower).items()})
    layers = _prune(loaded.model)
    zeros = _zeros(layers)
    facts = restore.restore_pruned(loaded.model, loaded.tokenizer, layers, RestoreSpec(steps=3, rank=2),
                                   CalibrationSpec(dataset=str(small_text), seq_len=32), dense, lambda _p: None,
                                   lambda: False)
    assert facts["mask_preserved"] is True
    assert all(torch.equal(layer.weight == 0, zeros[name]) for name, layer in layers.items())


# --- the pipeline -----------------------------------------------------------------------------------------


def _spec(model_dir: Path, dataset: Path, **overrides: object) -> PruneSpec:
    """test_pipeline's job, on shorter windows: restoration adds training steps on top."""
    return spec_for(model_dir, dataset, **{"calibration": CalibrationSpec(dataset=str(dataset), num_samples=4,
                                                                          seq_len=32),
                                           "evaluation": EvaluationSpec(num_samples=2, seq_len=32), **overrides})


def test_pipeline_restores_after_pruning_and_saves_exactly_the_pruned_zeros(tiny_llama_dir: Path, small_text: Path,
                                                                           tmp_path: Path) -> None:
    events: list[Progress] = []
    plain = run(_spec(tiny_llama_dir, small_text), tmp_path / "plain")
    restored = run(_spec(tiny_llama_dir, small_text, restore=RestoreSpec(steps=6, lr=1e-3, warmup_steps=0.5)),
                   tmp_path / "restored", on_progress=events.append)

    stages = [e.stage for e in events if e.done == 0 and "before restoration" not in e.message]
    assert stages == [s for s in STAGES if s not in ("scoring", "budget_search")]
    steps = [e for e in events if e.stage == "restoring" and e.done > 0]
    assert [e.done for e in steps] == list(range(1, 7)) and all("loss" in e.message for e in steps)

    info = restored.metrics["restore"]
    assert info["method"] == "sparse-lora" and info["steps"] == 6 and info["warmup_steps"] == 3
    assert info["mask_preserved"] is True and info["sparsity_after_merge"] == info["sparsity_before_merge"] == 0.5
    assert info["perplexity_before"] == plain.metrics["perplexity"]["pruned"]  # the same pruning, measured first
    assert restored.metrics["perplexity"]["pruned"] != info["perplexity_before"]  # measured after restoration
    assert len(info["losses"]) == 6 and info["seconds"] > 0 and info["cpu_seconds"] > 0
    assert restored.metrics["sparsity"] == plain.metrics["sparsity"]
    assert "restoring" in restored.metrics["timings_s"]
    report = json.loads(json.dumps(restored.report))
    assert report["spec"]["restore"]["steps"] == 6 and report["data"]["restore"]["kind"] == "text"

    a = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "restored")
    changed = False
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            assert torch.equal(pa == 0, pb == 0), name
            changed = changed or not torch.equal(pa, pb)
        else:
            assert torch.equal(pa, pb), name  # only the pruned layers are trained
    assert changed


def test_a_sweep_restores_every_sparsity(tiny_llama_dir: Path, small_text: Path, tmp_path: Path) -> None:
    result = run(_spec(tiny_llama_dir, small_text, sweep=(0.5, 0.7),
                       evaluation=EvaluationSpec(perplexity=False),
                       restore=RestoreSpec(steps=2, distill=0.5)), tmp_path)
    rows = result.metrics["sweep"]
    assert [row["sparsity"] for row in rows] == [0.5, 0.7]
    assert all(row["restore"]["mask_preserved"] for row in rows)
    assert all(row["restore"]["sparsity_after_merge"] == row["restore"]["sparsity_before_merge"] == row["achieved"]
               for row in rows)
    assert "perplexity_before" not in result.metrics["restore"]  # evaluation off: nothing measured


def test_pipeline_refuses_restore_before_pruning_when_it_cannot_run(tiny_llama_dir: Path, small_text: Path,
                                                                   tmp_path: Path) -> None:
    events: list[Progress] = []
    with pytest.raises(JobError) as info:
        run(_spec(tiny_llama_dir, small_text, restore=RestoreSpec(dataset="builtin:digits")), tmp_path,
            on_progress=events.append)
    assert info.value.code == "dataset_error"
    assert not [e for e in events if e.stage == "pruning"]
    with pytest.raises(JobError, match="name none"):
        run(_spec(tiny_llama_dir, small_text, restore=RestoreSpec(targets=("fc9",))), tmp_path)
