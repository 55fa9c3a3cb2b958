"""AlphaPruning and DLP against their definitions, exact totals for every allocation, ecoflap-zeroth's block
perturbation, and SparseGPT's shared Hessians against pruning one layer at a time."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from prunekit.vocabulary import ALLOCATIONS
from tests.unit.conftest import tiny_llama_from_config
from workers.pruning.allocation import budget, plan, scoring, spectral
from workers.pruning.methods import METHODS, sparsegpt
from workers.pruning.models import (
    block_linears,
    find_towers,
    method_view,
    plan_towers,
    prunable_layers,
    weight_matrix,
)
from workers.pruning.patterns import layer_prune_count
from workers.pruning.pipeline import run
from workers.pruning.sequential import (
    ModelInputs,
    _gather,
    capture_block_inputs,
    gather_stats,
    prune_towers,
    run_block,
)
from workers.pruning.spec import AllocationSpec, CalibrationSpec, EvaluationSpec, JobError, PruneSpec


def _inputs(samples: int = 2, tokens: int = 16, seed: int = 0) -> ModelInputs:
    ids = torch.randint(0, 256, (samples, tokens), generator=torch.Generator().manual_seed(seed))
    return ModelInputs({"input_ids": ids}, {"use_cache": False})


# --- AlphaPruning: the Hill estimator and its mapping ----------------------------------------------------------


def test_hill_on_two_eigenvalues_by_hand() -> None:
    # One candidate, λ_min = 1: α = 1 + 2 / (ln 1 + ln e) = 3.
    assert spectral.hill_alpha(torch.tensor([math.e, 1.0]), peak=False) == pytest.approx(3.0)


def test_hill_picks_the_xmin_with_the_smallest_ks_distance_by_hand() -> None:
    # ESD 1, e, e²:
    #   λ_min = 1: α = 1 + 3 / (0 + 1 + 2) = 2; fitted CDF 1 - 1/λ = 0, 0.632, 0.865 against 0, 1/3, 2/3:
    #     D = 0.632 - 0.333 = 0.299.
    #   λ_min = e: α = 1 + 2 / (0 + 1) = 3; fitted 0, 1 - e⁻² = 0.865 against 0, 1/2: D = 0.365.
    # The first fits better: α = 2.
    values = torch.tensor([1.0, math.e, math.e ** 2])
    assert spectral.hill_alpha(values, peak=False) == pytest.approx(2.0)


@pytest.mark.parametrize("peak", [False, True])
def test_hill_recovers_the_exponent_of_a_power_law(peak: bool) -> None:
    # p(λ) ∝ λ^-3 from λ_min = 0.5: λ = 0.5 U^(-1/2). (In log10 the density falls from λ_min on, so the fullest
    # bin is the first and the peak's window holds λ_min.)
    u = torch.rand(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    samples = 0.5 * u.pow(-1 / 2)
    assert spectral.hill_alpha(samples, peak=peak) == pytest.approx(3.0, abs=0.15)


def test_hill_is_undefined_without_two_positive_eigenvalues() -> None:
    assert math.isnan(spectral.hill_alpha(torch.tensor([0.0, 0.0, 4.0])))


def test_esd_is_the_squared_singular_values_ascending() -> None:
    weight = torch.diag(torch.tensor([3.0, 1.0, 2.0]))
    assert spectral.esd(weight).tolist() == pytest.approx([1.0, 4.0, 9.0])


def test_alpha_spread_by_hand() -> None:
    # α 2, 3, 4 with epsilon 0.2 -> raw 0.8, 1, 1.2: equal sizes keep the mean 1, so sparsities 0.4, 0.5, 0.6.
    assert budget.alpha_spread([2.0, 3.0, 4.0], [100, 100, 100], 0.5, 0.2) == pytest.approx([0.4, 0.5, 0.6])
    # Sizes 100, 100, 200: 0.5 * 400 = 200 pruned over 80 + 100 + 240 = 420 raw-weights: factor 200 / 420.
    assert budget.alpha_spread([2.0, 3.0, 4.0], [100, 100, 200], 0.5, 0.2) == pytest.approx(
        [0.8 * 200 / 420, 200 / 420, 1.2 * 200 / 420])
    # Equal exponents: the target everywhere.
    assert budget.alpha_spread([2.5, 2.5], [10, 30], 0.7) == pytest.approx([0.7, 0.7])


def test_alpha_spread_holds_groups_at_the_cap_and_rescales_the_rest() -> None:
    # α 1, 2, 3, epsilon 0.5, target 0.8: raw 0.5, 1, 1.5 -> 0.4, 0.8, 1.2; 1.2 is held at 0.9, then 1.0 too,
    # and the first takes what is left: 2.4 - 1.8 = 0.6.
    assert budget.alpha_spread([1.0, 2.0, 3.0], [1, 1, 1], 0.8, 0.5, 0.9) == pytest.approx([0.6, 0.9, 0.9])


@pytest.mark.parametrize("seed", range(10))
def test_alpha_spread_is_monotone_and_exact(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    groups = int(torch.randint(2, 40, (1,), generator=generator))
    sizes = torch.randint(10, 10_000, (groups,), generator=generator).tolist()
    alphas = (torch.rand(groups, generator=generator) * 4 + 1.5).tolist()
    target = float(torch.empty(1).uniform_(0.1, 0.85, generator=generator))
    result = budget.alpha_spread(alphas, sizes, target, 0.3, 0.99)
    assert budget.weighted_mean(result, sizes) == pytest.approx(target, abs=1e-12)
    assert all(0.0 <= s <= 0.99 + 1e-12 for s in result)
    order = sorted(range(groups), key=lambda g: alphas[g])
    assert all(result[a] <= result[b] + 1e-12 for a, b in zip(order, order[1:], strict=False))


def test_alphapruning_allocation_on_a_model_is_data_free_and_exact() -> None:
    model = tiny_llama_from_config(layers=4)
    towers = find_towers(model)
    spec = AllocationSpec(name="alphapruning")
    assert not plan.needs_data(spec) and plan.needs_scores(spec)
    raw = plan.raw_scores(model, towers, None, spec, 0, lambda: False, lambda _d, _t: None)
    layers = prunable_layers(model)
    assert set(raw["alphas"]) == set(layers)
    expected = {name: spectral.hill_alpha(spectral.esd(weight_matrix(layer))) for name, layer in layers.items()}
    assert raw["alphas"] == pytest.approx(expected)
    allocation = plan.allocate(plan_towers(towers, 0.6), spec, raw, joint_target=0.6)
    sizes = {name: weight_matrix(layer).numel() for name, layer in layers.items()}
    mean = sum(allocation.layer_sparsity[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert mean == pytest.approx(0.6, abs=1e-12)
    # A block's value is the plain mean of its layers' exponents, and the higher one is the sparser.
    groups = sorted(allocation.groups, key=lambda g: g["score"])
    prefix = towers[0].prefix
    first = [expected[f"{prefix}.0.{name}"] for name in block_linears(towers[0].blocks[0])]
    assert next(g for g in groups if g["name"] == f"{prefix}.0")["score"] == pytest.approx(sum(first) / len(first))
    assert [g["sparsity"] for g in groups] == sorted(g["sparsity"] for g in groups)


# --- DLP ---------------------------------------------------------------------------------------------------------


def test_dlp_spread_by_hand_and_as_the_reference_computes_it() -> None:
    # Unimportance 1, 2, 3: importance 1 - U/6 = 5/6, 4/6, 3/6; the most important the least sparse:
    # 0.5 - 0.1, 0.5, 0.5 + 0.1.
    assert budget.dlp_spread([1.0, 2.0, 3.0], [10, 10, 10], 0.5, 0.1) == pytest.approx([0.4, 0.5, 0.6])
    # The reference: keep = min-max scaled importance in [0, 2 alpha], minus its mean, plus 1 - target.
    u = torch.tensor([0.3, 0.9, 0.5, 2.0, 1.1], dtype=torch.float64)
    importance = 1 - u / u.sum()
    scaled = (importance - importance.min()) / (importance.max() - importance.min()) * 2 * 0.15
    keep = scaled - scaled.mean() + (1 - 0.7)
    assert budget.dlp_spread(u.tolist(), [7] * 5, 0.7, 0.15) == pytest.approx((1 - keep).tolist(), abs=1e-12)


def test_dlp_spread_meets_the_weighted_target_with_unequal_sizes() -> None:
    sizes = [100, 300, 50, 1000]
    result = budget.dlp_spread([0.2, 0.1, 0.4, 0.3], sizes, 0.6, 0.15)
    assert budget.weighted_mean(result, sizes) == pytest.approx(0.6, abs=1e-12)
    assert result[1] < result[0] < result[3] < result[2]  # the more unimportant, the sparser


def test_dlp_unimportance_is_the_median_wanda_score_with_rms_norms() -> None:
    model = tiny_llama_from_config(layers=1)
    inputs = _inputs(samples=2)
    towers = find_towers(model)
    per_layer = scoring.median_scores(model, towers, inputs, per_layer=True)
    per_block = scoring.median_scores(model, towers, inputs, per_layer=False)
    captured: dict[str, list[torch.Tensor]] = {}
    handles = [layer.register_forward_hook(lambda _m, args, _o, name=name: captured.setdefault(name, [])
                                           .append(args[0].reshape(-1, args[0].shape[-1])))
               for name, layer in prunable_layers(model).items()]
    with torch.no_grad():
        for sample in range(2):  # one sample per batch, as the scoring's batches of 4 see them: same tokens
            model(input_ids=inputs.tensors["input_ids"][sample:sample + 1], use_cache=False)
    for handle in handles:
        handle.remove()
    metrics = {}
    for name, layer in prunable_layers(model).items():
        x = torch.cat(captured[name])
        metrics[name] = (weight_matrix(layer).abs() * (x.pow(2).sum(0) / x.shape[0]).sqrt()).flatten()
        assert per_layer[name] == pytest.approx(float(metrics[name].median()), rel=1e-5)
    block = torch.cat(list(metrics.values()))
    assert per_block[f"{towers[0].prefix}.0"] == pytest.approx(float(block.median()), rel=1e-5)


def test_dlp_allocation_on_a_model_is_exact() -> None:
    model = tiny_llama_from_config(layers=4)
    towers = find_towers(model)
    spec = AllocationSpec(name="dlp")
    raw = plan.raw_scores(model, towers, _inputs(), spec, 0, lambda: False, lambda _d, _t: None)
    allocation = plan.allocate(plan_towers(towers, 0.7), spec, raw, joint_target=0.7)
    groups = allocation.groups
    assert budget.weighted_mean([g["sparsity"] for g in groups], [g["num_weights"] for g in groups]) == \
        pytest.approx(0.7, abs=1e-12)
    assert max(g["sparsity"] for g in groups) - min(g["sparsity"] for g in groups) == pytest.approx(0.3)


# --- exact totals ------------------------------------------------------------------------------------------------


def _allocation_options(name: str) -> AllocationSpec:
    return AllocationSpec(name=name, num_samples=2)


# Every allocation once and every method at least twice (each case prunes a model: all 18 pairs cost minutes).
_METHOD_ROTATION = ("sparsegpt", "wanda", "magnitude")


@pytest.mark.parametrize(("name", "method"), [(name, _METHOD_ROTATION[i % 3]) for i, name in enumerate(ALLOCATIONS)])
def test_every_layer_has_the_nearest_count_of_zeros_for_every_allocation(name: str, method: str) -> None:
    model = tiny_llama_from_config(layers=2)
    towers = find_towers(model)
    inputs = _inputs(samples=2)
    target = 0.6
    layer_sparsity = None
    if name != "uniform":
        spec = _allocation_options(name)
        raw = plan.raw_scores(model, towers, inputs, spec, 0, lambda: False, lambda _d, _t: None)
        layer_sparsity = plan.allocate(plan_towers(towers, target), spec, raw, joint_target=target).layer_sparsity
    prune_towers(model, plan_towers(towers, target), METHODS[method], "unstructured", inputs, batch_size=1,
                 layer_sparsity=layer_sparsity)
    zeros = total = 0
    for full, layer in prunable_layers(model).items():
        weight = weight_matrix(layer)
        ratio = target if layer_sparsity is None else layer_sparsity[full]
        count = int((weight == 0).sum())
        assert count == layer_prune_count(ratio, *weight.shape), (full, ratio)
        per_row = (weight == 0).sum(dim=1)
        assert int(per_row.max() - per_row.min()) <= 1, full
        zeros, total = zeros + count, total + weight.numel()
    # Every layer within half a weight of its ratio: the whole within half a weight per layer of the target.
    assert abs(zeros - target * total) <= len(prunable_layers(model)) / 2


def test_tiny_llama_at_0_6_with_ecoflap_zeroth_achieves_0_6(tiny_llama_dir: Path, small_text: Path,
                                                            tmp_path: Path) -> None:
    """The issue's case: 0.5943 when every row floored its own non-round ratio."""
    spec = PruneSpec(model_dir=tiny_llama_dir, method="wanda", sparsity=0.6,
                     calibration=CalibrationSpec(dataset=str(small_text), num_samples=4, seq_len=64),
                     evaluation=EvaluationSpec(perplexity=False),
                     allocation=AllocationSpec(name="ecoflap-zeroth", num_samples=2))
    result = run(spec, tmp_path / "out")
    assert result.metrics["sparsity"]["achieved"] == pytest.approx(0.6, abs=1e-4)


# --- ecoflap-zeroth with one direction per block -----------------------------------------------------------------


def _count_forwards(model: torch.nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_block_perturbation_runs_one_forward_per_block_and_direction() -> None:
    model = tiny_llama_from_config(layers=3)
    towers = find_towers(model)
    inputs = _inputs(samples=2)
    calls = _count_forwards(model)
    block = scoring.zeroth_order_scores(model, towers, inputs, perturbation="block")
    capture = 0  # capturing the first block's inputs stops every forward there: it never completes
    assert calls[0] == capture + 2 * 2 * 3  # two signs, two batches, three blocks
    assert set(block) == {f"{towers[0].prefix}.{i}" for i in range(3)}
    calls[0] = 0
    tensor = scoring.zeroth_order_scores(model, towers, inputs, perturbation="tensor")
    assert calls[0] == capture + 2 * 2 * 3 * 7  # seven matrices per Llama block
    # One direction over the block's matrices is not the sum of seven directional derivatives.
    for index in range(3):
        summed = sum(v for k, v in tensor.items() if k.startswith(f"{towers[0].prefix}.{index}."))
        assert block[f"{towers[0].prefix}.{index}"] != pytest.approx(summed, rel=1e-3)


def test_block_perturbation_is_the_directional_derivative_along_all_matrices() -> None:
    model = tiny_llama_from_config(layers=1)
    towers = find_towers(model)
    inputs = _inputs(samples=1)
    score = scoring.zeroth_order_scores(model, towers, inputs, eps=1e-3, seed=5, perturbation="block")
    layers = {name: weight_matrix(layer) for name, layer in prunable_layers(model).items()}
    saved = {name: w.detach().clone() for name, w in layers.items()}
    z = {name: scoring.direction(w, 5, name, 0) for name, w in layers.items()}
    losses = []
    with torch.no_grad():
        for sign in (1.0, -1.0):
            for name, w in layers.items():
                w.copy_(saved[name] + sign * 1e-3 * z[name])
            losses.append(float(scoring.model_loss(model, {**inputs.tensors, **inputs.options})))
        for name, w in layers.items():
            w.copy_(saved[name])
    assert score[f"{towers[0].prefix}.0"] == pytest.approx(abs(losses[0] - losses[1]) / 2e-3, rel=1e-4)


@pytest.mark.parametrize(("given", "chosen"), [
    ({}, ("block", 16, 32)),  # the default from bench/README.md's 3-seed study
    ({"granularity": "layer"}, ("tensor", 8, None)),  # no blocks to share a direction
    ({"perturbation": "tensor"}, ("tensor", 8, None)),
    ({"perturbation": "block", "num_samples": 4}, ("block", 4, 32)),  # what a request names is kept
    ({"seq_len": 64}, ("block", 16, 64)),
])
def test_zeroth_order_scoring_defaults_follow_the_perturbation(given: dict[str, object],
                                                               chosen: tuple[str, int, int | None]) -> None:
    spec = AllocationSpec(name="ecoflap-zeroth", **given)  # type: ignore[arg-type]
    assert (spec.perturbation, spec.num_samples, spec.seq_len) == chosen
    other = AllocationSpec(name="ecoflap-first", **{k: v for k, v in given.items() if k != "perturbation"})  # type: ignore[arg-type]
    assert other.num_samples == given.get("num_samples", 8) and other.seq_len == given.get("seq_len")


def test_block_perturbation_feeds_the_allocation_and_refuses_layer_granularity() -> None:
    model = tiny_llama_from_config(layers=2)
    towers = find_towers(model)
    spec = AllocationSpec(name="ecoflap-zeroth", perturbation="block", num_samples=1)
    raw = plan.raw_scores(model, towers, _inputs(samples=1), spec, 0, lambda: False, lambda _d, _t: None)
    allocation = plan.allocate(plan_towers(towers, 0.5), spec, raw, joint_target=0.5)
    assert [g["score"] for g in allocation.groups] == [raw["scores"][g["name"]] for g in allocation.groups]
    assert plan.cache_options(spec, 0)["perturbation"] == "block"
    # old keys hold for one direction per matrix
    assert "perturbation" not in plan.cache_options(AllocationSpec(name="ecoflap-zeroth", perturbation="tensor"), 0)
    with pytest.raises(JobError, match="granularity block"):
        plan.raw_scores(model, towers, _inputs(samples=1), dataclasses.replace(spec, granularity="layer"), 0,
                        lambda: False, lambda _d, _t: None)


# --- SparseGPT: one Hessian for the layers that read the same input ----------------------------------------------


@pytest.mark.parametrize(("pattern", "sparsities"), [("unstructured", [0.5, 0.5, 0.5]),
                                                     ("unstructured", [0.37, 0.61, 0.55]),
                                                     ("2:4", [0.5, 0.5, 0.5])])
def test_stacked_sparsegpt_is_bitwise_pruning_one_by_one(pattern: str, sparsities: list[float]) -> None:
    gen = torch.Generator().manual_seed(0)
    cols = 300  # three uneven column blocks
    inputs = torch.randn(400, cols, generator=gen) @ (torch.randn(cols, cols, generator=gen) / cols ** 0.5)
    hessian = sparsegpt.Hessian(cols)
    hessian.add(inputs)
    weights = [torch.randn(rows, cols, generator=gen) for rows in (48, 16, 16)]  # q, k, v of a GQA block
    stacked = sparsegpt.prune_stacked(weights, hessian.matrix, sparsities, pattern)
    for weight, sparsity, together in zip(weights, sparsities, stacked, strict=True):
        alone = sparsegpt.prune(weight, hessian.matrix, sparsity, pattern)
        assert torch.equal(together, alone)
        if pattern == "unstructured":
            assert int((alone == 0).sum()) == layer_prune_count(sparsity, *weight.shape)


def test_q_k_v_and_gate_up_share_one_statistics_object_equal_to_their_own() -> None:
    model = tiny_llama_from_config(layers=1)
    block = find_towers(model)[0].blocks[0]
    hidden, args = capture_block_inputs(model, block, _inputs(samples=3), 1)
    assert hidden is not None
    linears = block_linears(block)
    shared = gather_stats(block, linears, METHODS["sparsegpt"], hidden, args, 1)
    own = _gather(block, linears, METHODS["sparsegpt"], hidden, args, 1, share=False)
    names = [name.rsplit(".", 1)[-1] for name in linears]
    by_short = dict(zip(names, linears, strict=True))
    assert shared[by_short["q_proj"]] is shared[by_short["k_proj"]] is shared[by_short["v_proj"]]
    assert shared[by_short["gate_proj"]] is shared[by_short["up_proj"]]
    assert len({id(s) for s in shared.values()}) == 4  # qkv, o, gate-up, down
    for name in linears:
        assert torch.equal(shared[name].matrix, own[name].matrix), name


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_the_statistics_pass_stops_at_the_last_layers_input_with_the_same_statistics(method: str) -> None:
    """After the first batch, each batch's pass ends once the block's last layer (down_proj) has its input: its
    product is never computed, and every layer's statistics are those of running every batch whole."""
    model = tiny_llama_from_config(layers=1)
    block = find_towers(model)[0].blocks[0]
    hidden, args = capture_block_inputs(model, block, _inputs(samples=3), 1)
    assert hidden is not None
    linears = block_linears(block)
    new_stats = METHODS[method].new_stats
    assert new_stats is not None
    whole = {name: new_stats(method_view(layer)) for name, layer in linears.items()}
    handles = [layer.register_forward_hook(lambda _m, a, _o, name=name: whole[name].add(a[0]))
               for name, layer in linears.items()]
    run_block(block, hidden, args, 1, write_back=False)
    for handle in handles:
        handle.remove()
    [down] = [layer for name, layer in linears.items() if name.endswith("down_proj")]
    products: list[int] = []
    counting = down.register_forward_hook(lambda *_: products.append(1))
    gathered = gather_stats(block, linears, METHODS[method], hidden, args, 1)
    counting.remove()
    assert len(products) == 1  # three batches: the first ran whole, the other two stopped before down_proj's product
    for name in linears:
        mine, theirs = gathered[name], whole[name]
        assert mine.tokens == theirs.tokens, name
        if method == "sparsegpt":
            assert torch.allclose(mine.matrix, theirs.matrix, rtol=1e-6, atol=1e-7), name
        else:
            assert torch.equal(mine.norms(), theirs.norms()), name


def test_sparsegpt_with_shared_hessians_prunes_a_model_bitwise_as_one_by_one() -> None:
    inputs = _inputs(samples=2)
    results = []
    for method in (METHODS["sparsegpt"], dataclasses.replace(METHODS["sparsegpt"], prune_group=None)):
        model = tiny_llama_from_config(layers=2)
        towers = find_towers(model)
        ratios = {name: 0.4 + 0.03 * i for i, name in enumerate(prunable_layers(model))}  # per-layer ratios
        prune_towers(model, plan_towers(towers, 0.5), method, "unstructured", inputs, layer_sparsity=ratios)
        results.append({name: weight_matrix(layer).clone() for name, layer in prunable_layers(model).items()})
    assert all(torch.equal(results[0][name], results[1][name]) for name in results[0])
