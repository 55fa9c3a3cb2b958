import math

import pytest
import torch

from workers.pruning.patterns import (
    layer_prune_count,
    nm_mask,
    parse_pattern,
    prune_count,
    row_prune_counts,
    select_mask,
    unstructured_mask,
)


def brute_force_unstructured(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per row: rank entries by (score, index) with Python sorting and drop the first floor(s*in); then the
    round(s*rows*in) - rows*floor(s*in) rows whose next entry is lowest (by (score, row)) drop it too."""
    rows, width = scores.shape
    k = math.floor(round(sparsity * width, 9))
    extra = math.floor(sparsity * rows * width + 0.5) - rows * k
    mask = torch.ones(rows, width, dtype=torch.bool)
    orders = [sorted(range(width), key=lambda j, r=r: (float(scores[r, j]), j)) for r in range(rows)]
    for r in range(rows):
        for j in orders[r][:k]:
            mask[r, j] = False
    for r in sorted(range(rows), key=lambda r: (float(scores[r, orders[r][k]]), r))[:extra]:
        mask[r, orders[r][k]] = False
    return mask


@pytest.mark.parametrize("sparsity", [0.1, 0.25, 0.29, 0.5, 0.6, 0.7, 0.9, 0.99])
@pytest.mark.parametrize("width", [7, 64, 100, 172])
def test_unstructured_prunes_floor_or_ceil_per_row_and_the_nearest_total(sparsity: float, width: int) -> None:
    scores = torch.randn(13, width, generator=torch.Generator().manual_seed(width))
    mask = unstructured_mask(scores, sparsity)
    floor = math.floor(round(sparsity * width, 9))
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    zeros = (~mask).sum(dim=1)
    assert ((zeros == floor) | (zeros == floor + 1)).all()
    assert int(zeros.sum()) == layer_prune_count(sparsity, 13, width) == round(sparsity * 13 * width)
    assert torch.equal(zeros, row_prune_counts(scores, sparsity))


def test_the_extra_zeros_go_to_the_rows_whose_next_score_is_lowest() -> None:
    # 3 rows x 2 inputs at 0.5: 3 zeros, one per row; at 2/3: 4 zeros, so one row loses both.
    scores = torch.tensor([[1.0, 9.0], [2.0, 3.0], [0.5, 5.0]])
    assert row_prune_counts(scores, 0.5).tolist() == [1, 1, 1]
    # Next candidates 9, 3, 5: row 1's costs least.
    assert unstructured_mask(scores, 2 / 3).tolist() == [[False, True], [False, False], [False, True]]
    # Ties go to the lower row.
    assert row_prune_counts(torch.ones(3, 2), 2 / 3).tolist() == [2, 1, 1]
    # 0.6 of 2 x 5 is 6: floor 3 per row, no extra; 0.55 is 5.5, rounded up to 6 as well.
    assert row_prune_counts(torch.randn(2, 5), 0.55).tolist() == [3, 3]


def test_prune_count_survives_float_error() -> None:
    assert 0.29 * 100 < 29  # the trap: binary floats
    assert prune_count(0.29, 100) == 29
    assert prune_count(0.5, 7) == 3
    assert prune_count(0.999, 10) == 9


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_unstructured_matches_brute_force(sparsity: float) -> None:
    scores = torch.randn(9, 23, generator=torch.Generator().manual_seed(1))
    assert torch.equal(unstructured_mask(scores, sparsity), brute_force_unstructured(scores, sparsity))


def test_unstructured_ties_prune_lower_indices_first() -> None:
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 1.0, 0.0]])
    assert unstructured_mask(scores, 0.5).tolist() == [[False, False, True, True], [True, False, True, False]]


def test_unstructured_compares_within_rows_only() -> None:
    # Row 1's scores are all larger than row 0's, yet each row loses the same number of weights.
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [100.0, 200.0, 300.0, 400.0]])
    assert unstructured_mask(scores, 0.5).tolist() == [[False, False, True, True]] * 2


def test_unstructured_rejects_bad_sparsity() -> None:
    with pytest.raises(ValueError):
        unstructured_mask(torch.zeros(2, 2), 1.0)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_nm_groups_are_exact_and_keep_the_top_n(n: int, m: int) -> None:
    scores = torch.randn(6, 8 * m, generator=torch.Generator().manual_seed(m))
    mask = nm_mask(scores, n, m)
    for r in range(scores.shape[0]):
        for g in range(0, scores.shape[1], m):
            group = scores[r, g:g + m].tolist()
            kept = {j for j in range(m) if mask[r, g + j]}
            top = set(sorted(range(m), key=lambda j: (group[j], j))[m - n:])
            assert kept == top


def test_nm_requires_divisible_width() -> None:
    with pytest.raises(ValueError, match="divisible"):
        nm_mask(torch.zeros(2, 6), 2, 4)


def test_parse_pattern_and_dispatch() -> None:
    assert parse_pattern("unstructured") is None
    assert parse_pattern("2:4") == (2, 4)
    for bad in ("4:2", "2-4", "0:4", "dense"):
        with pytest.raises(ValueError):
            parse_pattern(bad)
    scores = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(select_mask(scores, 0.5, "2:4"), nm_mask(scores, 2, 4))
    assert torch.equal(select_mask(scores, 0.25, "unstructured"), unstructured_mask(scores, 0.25))


@pytest.mark.parametrize(("pattern", "requested"), [("2:4", 0.5), ("4:8", 0.5), ("2:4", 0.3), ("1:4", 0.9)])
def test_nm_pattern_fixes_the_sparsity_at_one_minus_n_over_m(pattern: str, requested: float) -> None:
    n, m = parse_pattern(pattern) or (0, 1)
    scores = torch.randn(5, 4 * m, generator=torch.Generator().manual_seed(2))
    mask = select_mask(scores, requested, pattern)
    assert ((~mask).sum(dim=1) == 4 * (m - n)).all()  # requested sparsity plays no part
    assert float((~mask).float().mean()) == 1 - n / m
