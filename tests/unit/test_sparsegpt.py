"""SparseGPT: exact in its special cases, exact in its counts, and better than Wanda where it counts."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.pruning import data
from workers.pruning.methods import get_method, magnitude, sparsegpt
from workers.pruning.patterns import layer_prune_count
from workers.pruning.pipeline import run
from workers.pruning.spec import CalibrationSpec, EvaluationSpec, JobError, PruneSpec


def hessian_of(x: torch.Tensor) -> sparsegpt.Hessian:
    stats = sparsegpt.Hessian(x.shape[-1])
    stats.add(x)
    return stats


def random_layer_and_inputs(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated inputs with uneven feature scales, as real activations have, so H is far from diagonal."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    mixing = torch.randn(cols, cols, generator=gen) / math.sqrt(cols)
    scales = torch.rand(cols, generator=gen) * 3 + 0.1
    inputs = (torch.randn(512, cols, generator=gen) @ mixing) * scales
    return weight, inputs


def assert_nm_groups(weight: torch.Tensor, n: int, m: int) -> None:
    zeros = (weight == 0).reshape(weight.shape[0], -1, m).sum(dim=2)
    assert (zeros == m - n).all(), zeros.unique()


def test_hessian_is_the_running_mean_of_2xxt_in_fp32() -> None:
    x = torch.randn(3, 10, 6, generator=torch.Generator().manual_seed(0))
    stats = sparsegpt.Hessian(6)
    stats.add(x[:1])  # batches of different sizes arrive one by one
    stats.add(x[1:].to(torch.bfloat16).float())
    stats.add(torch.empty(0, 6))
    flat = x.reshape(-1, 6).double()
    flat[10:] = x[1:].to(torch.bfloat16).double().reshape(-1, 6)
    assert stats.tokens == 30 and stats.matrix.dtype == torch.float32
    assert torch.allclose(stats.matrix.double(), 2 / 30 * flat.T @ flat, atol=1e-5)
    bf16 = sparsegpt.Hessian(6)
    bf16.add(x.to(torch.bfloat16))
    assert bf16.matrix.dtype == torch.float32


@pytest.mark.parametrize(("cols", "pattern", "sparsity"), [(64, "unstructured", 0.5), (100, "unstructured", 0.3),
                                                            (256, "2:4", 0.5), (256, "4:8", 0.5)])
def test_identity_hessian_is_magnitude_pruning_without_update(cols: int, pattern: str, sparsity: float) -> None:
    # Inputs 3·e_j, one token per feature: H = 2/cols · 9 · I, so every OBS update term H⁻¹_jk (k ≠ j) is 0.
    # (Unstructured stays within one 128-column block: across blocks the per-block counts differ from a
    # whole-row ranking, by design.)
    weight = torch.randn(12, cols, generator=torch.Generator().manual_seed(cols))
    stats = hessian_of(3 * torch.eye(cols))
    diagonal = torch.diagonal(stats.matrix)
    assert torch.equal(stats.matrix, torch.diag(diagonal)) and (diagonal == diagonal[0]).all()
    assert float(diagonal[0]) == pytest.approx(18 / cols)
    pruned = sparsegpt.prune(weight, stats.matrix, sparsity, pattern)
    assert torch.equal(pruned, weight * magnitude.mask(weight, sparsity, pattern))


def test_hand_computed_two_by_two_update() -> None:
    # One row w = (1, 3), H = [[2, 1], [1, 2]], plus 1% of the mean diagonal: H' = [[2.02, 1], [1, 2.02]].
    # Score w²/[U_jj]² with U the upper Cholesky factor of H'⁻¹: U_00² = 2.02/3.0804 and U_11² = 1/2.02, so
    # w_0 (score 1.53 against 18.2) goes, and its error moves onto w_1 by the OBS rule:
    # δw_1 = -w_0 · [H'⁻¹]_01 / [H'⁻¹]_00 = -1 · (-1) / 2.02.
    h = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    weight = torch.tensor([[1.0, 3.0]])
    pruned = sparsegpt.prune(weight, h, 0.5, "unstructured")
    assert torch.allclose(pruned, torch.tensor([[0.0, 3 + 1 / 2.02]]))
    # The undamped rule is the least-squares optimum on inputs with this H: rows x with 2/n · Σ x xᵀ = H.
    x = torch.linalg.cholesky(h).T
    best = min(torch.linspace(2, 5, 301).tolist(),
               key=lambda v: float(((weight - torch.tensor([[0.0, v]])) @ x.T).norm()))
    assert best == pytest.approx(3.5, abs=1e-4)


def test_dead_inputs_are_zeroed_and_pruned_first() -> None:
    weight, inputs = random_layer_and_inputs(8, 32, seed=3)
    inputs[:, [5, 17]] = 0
    pruned = sparsegpt.prune(weight, hessian_of(inputs).matrix, 0.25, "unstructured")
    assert (pruned[:, [5, 17]] == 0).all() and torch.isfinite(pruned).all()
    assert ((pruned == 0).sum(dim=1) == 8).all()


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("cols", [96, 300])  # one block, and three uneven ones
def test_unstructured_rows_have_floor_or_ceil_zeros_and_the_layer_the_nearest_total(sparsity: float,
                                                                                     cols: int) -> None:
    weight, inputs = random_layer_and_inputs(24, cols, seed=cols)
    pruned = sparsegpt.prune(weight, hessian_of(inputs).matrix, sparsity, "unstructured")
    zeros = (pruned == 0).sum(dim=1)
    floor = math.floor(sparsity * cols + 1e-9)
    assert ((zeros == floor) | (zeros == floor + 1)).all()
    assert int(zeros.sum()) == layer_prune_count(sparsity, 24, cols)


def prune_with(name: str, weight: torch.Tensor, inputs: torch.Tensor, sparsity: float,
               pattern: str) -> torch.Tensor:
    method = get_method(name)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    stats = method.new_stats(layer) if method.new_stats is not None else None
    if stats is not None:
        stats.add(inputs)
    return method.prune(weight, stats, sparsity, pattern)


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_nm_every_group_has_exactly_m_minus_n_zeros(name: str, n: int, m: int) -> None:
    weight, inputs = random_layer_and_inputs(16, 320, seed=m)
    pruned = prune_with(name, weight, inputs, 1 - n / m, f"{n}:{m}")
    assert_nm_groups(pruned, n, m)


def test_nm_needs_divisible_width() -> None:
    with pytest.raises(JobError) as info:
        sparsegpt.prune(torch.randn(2, 6), torch.eye(6), 0.5, "2:4")
    assert info.value.code == "unsupported_pattern"


def test_bf16_weight_comes_back_bf16_and_exactly_sparse() -> None:
    weight, inputs = random_layer_and_inputs(8, 64, seed=5)
    pruned = prune_with("sparsegpt", weight.to(torch.bfloat16), inputs.to(torch.bfloat16), 0.5, "2:4")
    assert pruned.dtype == torch.bfloat16
    assert_nm_groups(pruned, 2, 4)


def test_indefinite_hessian_is_rescued_by_more_dampening(monkeypatch: pytest.MonkeyPatch) -> None:
    # A diagonal entry of -0.5 fails with 1% and 10% of the mean diagonal (0.625) added; 100% rescues it.
    damped: list[float] = []
    factor = torch.linalg.cholesky

    def spy(a: torch.Tensor, *, upper: bool = False) -> torch.Tensor:
        if not upper:
            damped.append(float(a[2, 2]) + 0.5)
        return factor(a, upper=upper)

    monkeypatch.setattr(torch.linalg, "cholesky", spy)
    h = torch.diag(torch.tensor([1.0, 1.0, -0.5, 1.0]))
    weight = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    pruned = sparsegpt.prune(weight, h, 0.5, "unstructured")
    assert damped == pytest.approx([0.00625, 0.0625, 0.625])
    assert torch.isfinite(pruned).all() and int((pruned == 0).sum()) == 2


def test_singular_hessian_is_factored_thanks_to_dampening() -> None:
    # Two identical inputs make H exactly singular (rank 1): dampening alone must make it factorable.
    x = torch.randn(64, 1).repeat(1, 2)
    pruned = sparsegpt.prune(torch.tensor([[1.0, 2.0]]), hessian_of(x).matrix, 0.5, "unstructured")
    assert torch.isfinite(pruned).all() and int((pruned == 0).sum()) == 1


def test_hopeless_hessian_is_a_readable_job_error() -> None:
    h = torch.eye(4)
    h[1, 2] = h[2, 1] = float("nan")
    with pytest.raises(JobError) as info:
        sparsegpt.prune(torch.ones(3, 4), h, 0.5, "unstructured")
    assert info.value.code == "numerical_error" and "Hessian" in info.value.message


def test_without_statistics_it_refuses() -> None:
    method = get_method("sparsegpt")
    empty = method.new_stats(nn.Linear(4, 2))  # type: ignore[misc]
    with pytest.raises(RuntimeError, match="calibration token"):
        method.prune(torch.ones(2, 4), empty, 0.5, "unstructured")


# --- a real layer --------------------------------------------------------------------------------------------


class _Enough(Exception):
    """Raised once block 3 has run: the 26 blocks after it would only cost time."""


@pytest.fixture(scope="module")
def smollm2_layers(smollm2_dir: Path, small_text: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Block 3's o_proj and down_proj weights with the inputs they receive on 16 windows of 128 real tokens
    (2048 tokens: more than down_proj's 1536 inputs, so its H is not rank-deficient before dampening)."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    windows = data.calibration_windows(data.token_stream(str(small_text), tokenizer), 16, 128, seed=0)
    block = model.model.layers[3]
    layers = {"self_attn.o_proj": block.self_attn.o_proj, "mlp.down_proj": block.mlp.down_proj}
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = [layer.register_forward_hook(lambda _m, args, _out, name=name: inputs[name].append(args[0]))
               for name, layer in layers.items()]

    def stop(*_: object) -> None:
        raise _Enough

    handles.append(block.register_forward_hook(stop))
    with torch.inference_mode(), contextlib.suppress(_Enough):
        model(windows, use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: (layer.weight.detach().clone(), torch.cat(inputs[name]).reshape(-1, layer.in_features))
            for name, layer in layers.items()}


@pytest.mark.parametrize("layer", ["self_attn.o_proj", "mlp.down_proj"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_a_real_layer_better_than_wanda_and_magnitude(
        smollm2_layers: dict[str, tuple[torch.Tensor, torch.Tensor]], layer: str, pattern: str) -> None:
    weight, inputs = smollm2_layers[layer]
    dense_out = inputs @ weight.T
    errors = {name: float((dense_out - inputs @ prune_with(name, weight, inputs, 0.5, pattern).T).norm())
              for name in ("sparsegpt", "wanda", "magnitude")}
    print(f"\n{layer} {pattern} ||WX - ŴX||_F: {errors}")
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"]


# --- the whole pipeline --------------------------------------------------------------------------------------


def test_pipeline_sparsegpt_2_4_saves_exact_groups(tiny_llama_dir: Path, small_text: Path, tmp_path: Path) -> None:
    spec = PruneSpec(tiny_llama_dir, "sparsegpt", 0.5, pattern="2:4",
                     calibration=CalibrationSpec(dataset=str(small_text), num_samples=4, seq_len=64),
                     evaluation=EvaluationSpec(num_samples=4, seq_len=64))
    result = run(spec, tmp_path / "out")
    per_layer = result.metrics["sparsity"]["per_layer"]
    assert len(per_layer) == 14 and set(per_layer.values()) == {0.5}
    assert result.metrics["sparsity"]["achieved"] == 0.5
    assert all(math.isfinite(v) for v in result.metrics["perplexity"].values())
    saved = load_file(tmp_path / "out" / "model.safetensors")
    dense = load_file(tiny_llama_dir / "model.safetensors")
    projections = [name for name in saved if name.startswith("model.layers.") and name.endswith("proj.weight")]
    assert len(projections) == 14
    for name in projections:
        assert_nm_groups(saved[name], 2, 4)
        kept = saved[name] != 0
        assert not torch.equal(saved[name][kept], dense[name][kept]), f"{name}: the kept weights were updated"


def test_pipeline_refuses_a_sparsity_the_pattern_cannot_meet(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = PruneSpec(tiny_llama_dir, "magnitude", 0.6, pattern="4:8",
                     evaluation=EvaluationSpec(perplexity=False))
    with pytest.raises(JobError) as info:
        run(spec, tmp_path / "out")
    assert info.value.code == "invalid_spec" and "fixes sparsity at 0.5" in info.value.message
