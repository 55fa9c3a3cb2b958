"""Allocations against their definitions: water-filling and OWL on hand-made numbers, the zeroth-order
estimate against the true directional derivative, and the fast path against the naive full re-forward."""

from __future__ import annotations

import math

import pytest
import torch

from tests.unit.conftest import tiny_llama_from_config
from workers.pruning.allocation import budget, plan, scoring
from workers.pruning.models import find_towers, load_model, plan_towers, prunable_layers, weight_matrix
from workers.pruning.sequential import ModelInputs
from workers.pruning.spec import AllocationSpec


def test_water_filling_by_hand() -> None:
    # Two groups of 100 weights, target 0.5, max 0.6: each starts keeping 40; the 20 left go 3:1 -> 15 and 5.
    assert budget.water_fill([3.0, 1.0], [100, 100], 0.5, 0.6) == pytest.approx([1 - 55 / 100, 1 - 45 / 100])
    # Sizes 100 and 300: start 40 + 120 = 160 kept of the 200 budget; 40 more split 1:1.
    result = budget.water_fill([1.0, 1.0], [100, 300], 0.5, 0.6)
    assert result == pytest.approx([1 - 60 / 100, 1 - 140 / 300])


def test_water_filling_caps_a_group_at_all_its_weights_and_shares_the_rest_again() -> None:
    # Group 0 would get 0.9 * 50 = 45 more than its 10 minimum: capped at 10 + ... = 20 (all its weights).
    sizes, scores = [20, 100, 100], [1000.0, 1.0, 1.0]
    result = budget.water_fill(scores, sizes, 0.5, 0.8)
    assert result[0] == 0.0  # kept whole
    keep = [n * (1 - s) for s, n in zip(result, sizes, strict=True)]
    assert sum(keep) == pytest.approx(110)
    assert result[1] == pytest.approx(result[2])


@pytest.mark.parametrize("seed", range(20))
def test_water_filling_meets_the_target_exactly_and_respects_max_sparsity(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    groups = int(torch.randint(2, 40, (1,), generator=generator))
    sizes = torch.randint(10, 10_000, (groups,), generator=generator).tolist()
    scores = (torch.rand(groups, generator=generator) ** 4 * 100).tolist()
    target = float(torch.empty(1).uniform_(0.1, 0.85, generator=generator))
    top = min(target + 0.1, 0.99)
    result = budget.water_fill(scores, sizes, target, top)
    assert budget.weighted_mean(result, sizes) == pytest.approx(target, abs=1e-12)
    assert all(0.0 <= s <= top + 1e-12 for s in result)
    # Beyond its minimum, every group that is not kept whole gets the same keep per unit of score.
    extra = [n * (1 - s) - math.ceil(n * (1 - top) - 1e-9) for s, n in zip(result, sizes, strict=True)]
    shared = [g for g in range(groups) if result[g] > 1e-9]
    per_score = extra[max(shared, key=lambda g: scores[g])] / max(scores[g] for g in shared)
    assert all(abs(extra[g] - per_score * scores[g]) < 1e-6 for g in shared)


def test_water_filling_refuses_a_max_below_the_target() -> None:
    with pytest.raises(ValueError, match="max_sparsity"):
        budget.water_fill([1.0, 2.0], [10, 10], 0.5, 0.4)


def test_owl_spread_by_hand() -> None:
    # Ratios 0, 0.5, 1 map to 0.58, 0.5, 0.42 (the most outliers, the least sparse); equal sizes: mean 0.5 already.
    assert budget.owl_spread([0.0, 0.5, 1.0], [10, 10, 10], 0.5, 0.08) == pytest.approx([0.58, 0.5, 0.42])
    # Unequal sizes: shifted by one constant so that the weighted mean is the target.
    result = budget.owl_spread([0.0, 1.0], [10, 30], 0.5, 0.08)
    assert result[0] - result[1] == pytest.approx(0.16)
    assert budget.weighted_mean(result, [10, 30]) == pytest.approx(0.5, abs=1e-12)
    assert budget.owl_spread([0.2, 0.2], [5, 7], 0.6) == pytest.approx([0.6, 0.6])


def _inputs(samples: int = 3, tokens: int = 24, vocab: int = 256) -> ModelInputs:
    ids = torch.randint(0, vocab, (samples, tokens), generator=torch.Generator().manual_seed(1))
    return ModelInputs({"input_ids": ids}, {"use_cache": False})


def test_zeroth_order_estimate_is_the_directional_derivative() -> None:
    """g = (L(W + eps z) - L(W - eps z)) / 2 eps equals grad . z up to O(eps^2): checked in float64 (Llama's
    RMSNorm still computes in fp32, which sets the noise floor near 1e-5 relative at this eps)."""
    model = tiny_llama_from_config(layers=2).double()
    inputs = _inputs(samples=1)
    towers = find_towers(model)
    name = f"{towers[0].prefix}.1.mlp.up_proj"
    layer = model.get_submodule(name)
    scores = scoring.zeroth_order_scores(model, towers, inputs, eps=1e-3, seed=3)
    loss = scoring.model_loss(model, {**inputs.tensors, **inputs.options})
    loss.backward()
    z = scoring.direction(layer.weight, 3, name, 0).double()
    expected = abs(float((layer.weight.grad * z).sum()))
    assert scores[name] == pytest.approx(expected, rel=1e-4)


def test_fast_zeroth_order_scores_equal_the_naive_ones_bit_for_bit_and_weights_come_back() -> None:
    model = tiny_llama_from_config(layers=3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    towers = find_towers(model)
    fast = scoring.zeroth_order_scores(model, towers, _inputs(), fast=True)
    naive = scoring.zeroth_order_scores(model, towers, _inputs(), fast=False)
    assert fast == naive
    assert set(fast) == set(prunable_layers(model)) and all(value > 0 for value in fast.values())
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_fast_path_matches_on_clip_whose_blocks_return_tuples(tiny_model) -> None:  # noqa: ANN001
    from workers.pruning import multimodal

    model = load_model(tiny_model("clip")).model
    inputs = multimodal.calibration_inputs(model, torch.randint(0, 99, (8, 7), generator=torch.Generator()
                                                                 .manual_seed(0)),
                                           multimodal.synthetic_pixels(model, 8, 0))
    towers = find_towers(model)
    fast = scoring.zeroth_order_scores(model, towers, inputs, fast=True)
    naive = scoring.zeroth_order_scores(model, towers, inputs, fast=False)
    assert fast == naive and {t.name for t in towers} == {"vision", "language"}
    assert sum(value > 0 for value in fast.values()) > len(fast) // 2


def test_bf16_perturbation_restores_the_exact_weights() -> None:
    """Adding and subtracting eps*z in bf16 does not give W back; the saved copy does."""
    model = tiny_llama_from_config(layers=1).to(torch.bfloat16)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    scoring.zeroth_order_scores(model, find_towers(model), _inputs(samples=2, tokens=12), eps=1e-2)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    weight = before[f"{find_towers(model)[0].prefix}.0.mlp.up_proj.weight"]
    z = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    drifted = (weight + 1e-2 * z) - 1e-2 * z
    assert not torch.equal(drifted, weight)  # why the copy is needed


def test_first_order_scores_are_weight_times_gradient() -> None:
    model = tiny_llama_from_config(layers=2)
    inputs = _inputs(samples=2)
    scores = scoring.first_order_scores(model, find_towers(model), inputs)
    assert all(p.grad is None for p in model.parameters())
    expected = dict.fromkeys(scores, 0.0)
    for sample in range(2):
        model.zero_grad()
        scoring.model_loss(model, {"input_ids": inputs.tensors["input_ids"][sample:sample + 1],
                                   **inputs.options}).backward()
        for name in expected:
            layer = model.get_submodule(name)
            expected[name] += float((layer.weight * layer.weight.grad).abs().sum())
    assert scores == pytest.approx(expected, rel=1e-5)


def test_outlier_counts_follow_the_definition_on_one_layer() -> None:
    model = tiny_llama_from_config(layers=1)
    inputs = _inputs(samples=2)
    towers = find_towers(model)
    counts = scoring.outlier_ratios(model, towers, inputs, per_layer=True, multiple=2.0)
    name = f"{towers[0].prefix}.0.self_attn.q_proj"
    captured: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_hook(lambda _m, args, _o: captured.append(args[0]))
    with torch.no_grad():
        model(**inputs.tensors, **inputs.options)
    handle.remove()
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])
    metric = weight_matrix(model.get_submodule(name)).abs() * x.pow(2).sum(0).sqrt()
    assert counts[name] == (int((metric > 2.0 * metric.mean()).sum()), metric.numel())


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_joint_allocation_meets_the_target_exactly_over_all_towers(granularity: str) -> None:
    model = tiny_llama_from_config(layers=4)
    towers = plan_towers(find_towers(model), 0.6)
    scores = {name: float(i + 1) for i, name in enumerate(prunable_layers(model))}
    spec = AllocationSpec(name="ecoflap-zeroth", granularity=granularity)
    allocation = plan.allocate(towers, spec, {"scores": scores}, joint_target=0.6)
    sizes = {name: weight_matrix(layer).numel() for name, layer in prunable_layers(model).items()}
    mean = sum(allocation.layer_sparsity[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert mean == pytest.approx(0.6, abs=1e-12)
    assert max(allocation.layer_sparsity.values()) <= 0.7 + 1e-12
    assert len({round(v, 9) for v in allocation.layer_sparsity.values()}) > 1
    # Later layers scored higher here, so they keep more.
    first, last = (f"{towers[0][0].prefix}.{i}.mlp.down_proj" for i in (0, 3))
    assert allocation.layer_sparsity[first] > allocation.layer_sparsity[last]
    assert math.isclose(allocation.per_tower["language"], 0.6, abs_tol=1e-9)
