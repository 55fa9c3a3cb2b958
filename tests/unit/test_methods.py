import math

import pytest
import torch
from torch import nn

from workers.pruning.methods import get_method, magnitude, wanda
from workers.pruning.spec import JobError

# Hand-made: 3 output rows, 4 input features, 5 calibration tokens.
W = torch.tensor([[0.5, -2.0, 1.0, 0.1],
                  [-1.0, 0.2, -0.3, 3.0],
                  [0.4, 0.4, -4.0, 0.05]])
X = torch.tensor([[1.0, 0.0, 0.5, 2.0],
                  [2.0, 0.1, 0.0, -2.0],
                  [-1.0, 0.0, 0.5, 1.0],
                  [0.5, 0.1, 0.0, 0.0],
                  [0.0, 0.0, 0.5, 3.0]])


def feature_norms_by_loops(x: torch.Tensor) -> list[float]:
    return [math.sqrt(sum(float(x[t, j]) ** 2 for t in range(x.shape[0]))) for j in range(x.shape[1])]


def row_mask_by_loops(scores: list[list[float]], sparsity: float) -> list[list[bool]]:
    mask = []
    for row in scores:
        k = math.floor(sparsity * len(row) + 1e-9)
        pruned = set(sorted(range(len(row)), key=lambda j: (row[j], j))[:k])
        mask.append([j not in pruned for j in range(len(row))])
    return mask


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_magnitude_mask_matches_definition(sparsity: float) -> None:
    scores = [[abs(float(w)) for w in row] for row in W]
    assert magnitude.mask(W, sparsity).tolist() == row_mask_by_loops(scores, sparsity)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_wanda_mask_matches_definition(sparsity: float) -> None:
    norms = feature_norms_by_loops(X)
    scores = [[abs(float(W[i, j])) * norms[j] for j in range(W.shape[1])] for i in range(W.shape[0])]
    stats = wanda.InputNorms(4)
    stats.add(X[:2])  # statistics arrive in several batches
    stats.add(X[2:].unsqueeze(0))  # and with a batch dimension, as a Linear inside a block sees them
    assert stats.tokens == 5
    assert torch.allclose(stats.norms(), torch.tensor(norms))
    assert wanda.mask(W, stats.norms(), sparsity).tolist() == row_mask_by_loops(scores, sparsity)


def test_wanda_differs_from_magnitude_where_activations_matter() -> None:
    # Feature 1 carries almost no signal: wanda drops -2.0 there, magnitude drops 0.1 of feature 3.
    norms = torch.tensor(feature_norms_by_loops(X))
    assert wanda.mask(W, norms, 0.25)[0].tolist() == [True, False, True, True]
    assert magnitude.mask(W, 0.25)[0].tolist() == [True, True, True, False]


def test_wanda_statistics_gathered_from_a_linear_forward_hook() -> None:
    layer = nn.Linear(4, 3, bias=False)
    stats = wanda.InputNorms(layer.in_features)
    handle = layer.register_forward_hook(lambda _m, args, _out: stats.add(args[0]))
    layer(X.reshape(1, 5, 4))
    handle.remove()
    assert torch.allclose(stats.norms(), torch.tensor(feature_norms_by_loops(X)))


def test_wanda_statistics_stay_fp32_for_bf16_inputs() -> None:
    stats = wanda.InputNorms(4)
    stats.add(X.to(torch.bfloat16))
    assert stats.sum_sq.dtype == torch.float32


def test_methods_return_the_weight_with_zeros_at_the_mask() -> None:
    method = get_method("wanda")
    layer = nn.Linear(4, 3, bias=False)
    layer.weight.data.copy_(W)
    stats = method.new_stats(layer)  # type: ignore[misc]
    stats.add(X)
    pruned = method.prune(W, stats, 0.5, "unstructured")
    keep = wanda.mask(W, torch.tensor(feature_norms_by_loops(X)), 0.5)
    assert torch.equal(pruned, W * keep)
    assert torch.equal(pruned == 0, ~keep)
    assert get_method("magnitude").new_stats is None


@pytest.mark.parametrize("name", ["obc", "random", ""])
def test_unknown_method_is_a_job_error(name: str) -> None:
    with pytest.raises(JobError) as info:
        get_method(name)
    assert info.value.code == "unsupported_method" and "magnitude" in info.value.message
