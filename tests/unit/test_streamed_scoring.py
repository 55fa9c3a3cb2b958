"""Block-major zeroth-order scoring against the fast path (scoring.zeroth_order_scores): the same dict, bit for bit,
on a tiny Llama, SmolLM2 and two-tower CLIP, and each block read exactly as many times as the plan says."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.unit.conftest import tiny_llama_from_config
from workers.pruning import multimodal
from workers.pruning.allocation import scoring
from workers.pruning.allocation.streamed_scoring import (
    plan,
    tower_units,
    zeroth_order_scores_blockwise,
)
from workers.pruning.models import Tower, find_towers, load_model
from workers.pruning.sequential import ModelInputs
from workers.pruning.spec import JobCancelled


def _inputs(samples: int = 3, tokens: int = 24, vocab: int = 256) -> ModelInputs:
    ids = torch.randint(0, vocab, (samples, tokens), generator=torch.Generator().manual_seed(1))
    return ModelInputs({"input_ids": ids}, {"use_cache": False})


class _Reads:
    """The in-memory blocks, counting how often each (tower, block) is asked for: what a stream would read."""

    def __init__(self) -> None:
        self.count: Counter[tuple[str, int]] = Counter()

    @contextlib.contextmanager
    def __call__(self, tower: Tower, index: int) -> Iterator[nn.Module]:
        self.count[(tower.name, index)] += 1
        yield tower.blocks[index]

    @property
    def total(self) -> int:
        return sum(self.count.values())


def test_plan_groups_consecutive_units_and_counts_the_block_reads_by_hand() -> None:
    units = tower_units("m.layers", [["q", "k"], ["q", "k"], ["q", "k"]], "tensor")
    assert [u.key for u in units] == [f"m.layers.{b}.{n}" for b in range(3) for n in ("q", "k")]
    assert units[2].members == ("q",) and units[2].full_names == ("m.layers.1.q",)
    # A branch of 100 bytes: 400 bytes hold two units (four branches): groups start in blocks 0, 1 and 2.
    grouped = plan(units, 3, 100, 400)
    assert [[u.key for u in g] for g in grouped.groups] == [["m.layers.0.q", "m.layers.0.k"],
                                                            ["m.layers.1.q", "m.layers.1.k"],
                                                            ["m.layers.2.q", "m.layers.2.k"]]
    assert grouped.block_reads == 3 + 2 + 1
    assert plan(units, 3, 100, 600).block_reads == 3 + 2  # groups of three: blocks 0-1, then 1-2
    assert plan(units, 3, 100, None).block_reads == 3  # one pass
    assert plan(units, 3, 100, 1).block_reads == 2 * (3 + 2 + 1)  # a unit per pass, whatever the budget
    blocks = tower_units("m.layers", [["q", "k"], [], ["q"]], "block", layers={"m.layers.2.q"})
    assert [(u.key, u.members) for u in blocks] == [("m.layers.2", ("q",))]
    assert plan(blocks, 3, 100, None).block_reads == 3  # the dense states still go through blocks 0 and 1


@pytest.mark.parametrize("perturbation", ["tensor", "block"])
def test_tiny_llama_scores_equal_the_fast_path_bit_for_bit_with_one_or_many_passes(perturbation: str) -> None:
    model = tiny_llama_from_config(layers=3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    towers = find_towers(model)
    inputs = _inputs()
    fast = scoring.zeroth_order_scores(model, towers, inputs, seed=7, perturbation=perturbation)
    branch = 3 * 24 * 64 * 4  # a branch: every sample's hidden states, fp32
    units = 7 if perturbation == "tensor" else 1  # per block
    # Budget for three units (six branches): tensor groups start at units 0, 3, 6 (block 0), 9, 12 (block 1), 15
    # and 18 (block 2); with block perturbation, the three blocks are three units: one group.
    expected_reads = {None: 3, 6 * branch: 3 + 3 + 3 + 2 + 2 + 1 + 1 if units == 7 else 3,
                      1: units * (3 + 2 + 1)}
    for budget, reads in expected_reads.items():
        counter = _Reads()
        result = zeroth_order_scores_blockwise(model, towers, inputs, seed=7, perturbation=perturbation,
                                               max_live_bytes=budget, block=counter)
        assert result.scores == fast
        assert counter.total == result.block_reads == reads
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_a_sample_of_layers_and_progress_match_the_fast_path() -> None:
    model = tiny_llama_from_config(layers=3)
    towers = find_towers(model)
    prefix = towers[0].prefix
    sample = {f"{prefix}.1.mlp.up_proj", f"{prefix}.2.self_attn.k_proj"}
    fast = scoring.zeroth_order_scores(model, towers, _inputs(), layers=sample)
    steps: list[tuple[int, int]] = []
    counter = _Reads()
    result = zeroth_order_scores_blockwise(model, towers, _inputs(), layers=sample, max_live_bytes=1, block=counter,
                                           on_layer=lambda done, total: steps.append((done, total)))
    assert result.scores == fast and set(fast) == sample
    assert steps == [(1, 2), (2, 2)]
    # The first pass starts at block 0 (the dense states enter there), the second at block 2.
    assert counter.count == Counter({("language", 0): 1, ("language", 1): 1, ("language", 2): 2})


def test_cancelling_stops_the_scoring() -> None:
    model = tiny_llama_from_config(layers=2)
    with pytest.raises(JobCancelled):
        zeroth_order_scores_blockwise(model, find_towers(model), _inputs(), should_cancel=lambda: True)


@pytest.mark.parametrize("fix_other_towers", [False, True])
def test_clip_two_towers_equal_the_fast_path_bit_for_bit(tiny_model: Callable[[str], Path],
                                                         fix_other_towers: bool) -> None:
    model = load_model(tiny_model("clip")).model
    generator = torch.Generator().manual_seed(0)
    inputs = multimodal.calibration_inputs(model, torch.randint(0, 99, (8, 7), generator=generator),
                                           multimodal.synthetic_pixels(model, 8, 0))
    towers = find_towers(model)
    fast = scoring.zeroth_order_scores(model, towers, inputs)
    for budget in (None, 1):
        counter = _Reads()
        result = zeroth_order_scores_blockwise(model, towers, inputs, max_live_bytes=budget, block=counter,
                                               fix_other_towers=fix_other_towers)
        assert result.scores == fast
        assert counter.total == result.block_reads
        # The other tower, fixed: one dense pass over each tower first (two blocks each), read once.
        assert result.fixed_reads == (4 if fix_other_towers else 0)
        # Per tower: one pass; or one per unit, six matrices in each of two blocks: 6 * (2 + 1) reads.
        assert result.block_reads == result.fixed_reads + (2 + 2 if budget is None else 2 * 6 * (2 + 1))


def test_a_model_that_reads_a_towers_inner_states_is_refused(tiny_model: Callable[[str], Path]) -> None:
    """LLaVA feeds its projector the vision tower's second-to-last layer: a head from final states cannot
    reproduce the loss, and the check says so before any pass."""
    model = load_model(tiny_model("llava")).model
    inputs = multimodal.calibration_inputs(model, torch.randint(0, 99, (2, 7), generator=torch.Generator()
                                                                 .manual_seed(0)),
                                           multimodal.synthetic_pixels(model, 2, 0))
    towers = find_towers(model)
    vision = [t for t in towers if t.name == "vision"]
    counter = _Reads()
    with pytest.raises(ValueError, match="vision tower"):
        zeroth_order_scores_blockwise(model, vision, inputs, block=counter)
    assert counter.total == 0
    language = [t for t in towers if t.name == "language"]
    assert (zeroth_order_scores_blockwise(model, language, inputs).scores
            == scoring.zeroth_order_scores(model, language, inputs))


@pytest.mark.parametrize("perturbation", ["tensor", "block"])
def test_smollm2_scores_equal_the_fast_path_bit_for_bit(smollm2_dir: Path, perturbation: str) -> None:
    model = load_model(smollm2_dir).model
    towers = find_towers(model)
    prefix = towers[0].prefix
    inputs = _inputs(samples=2, tokens=32, vocab=model.config.vocab_size)
    branches = 2 * 2 * 32 * model.config.hidden_size * 4  # a unit's two branches, fp32
    if perturbation == "tensor":
        layers = {f"{prefix}.0.self_attn.q_proj", f"{prefix}.14.mlp.down_proj", f"{prefix}.29.mlp.gate_proj"}
        budgets = {None: 30, branches: 30 + 16 + 1}  # a unit per pass
    else:
        layers = {f"{prefix}.{index}.mlp.up_proj" for index in (0, 24, 25)}
        budgets = {None: 30, 2 * branches: 30 + 5}  # two units per pass: blocks 0 and 24, then 25
    fast = scoring.zeroth_order_scores(model, towers, inputs, layers=layers, perturbation=perturbation)
    for budget, reads in budgets.items():
        counter = _Reads()
        result = zeroth_order_scores_blockwise(model, towers, inputs, layers=layers, perturbation=perturbation,
                                               max_live_bytes=budget, block=counter)
        assert result.scores == fast and len(fast) == 3
        assert counter.total == result.block_reads == reads
