"""Non-uniform allocations on a model streamed from disk (`offload: "disk"`): the scores come block by block, each
block read a bounded number of times, and the job's output and allocation are the in-memory job's (bit for bit;
ecoflap-first's scores within float rounding, their graph being another)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.unit.conftest import tiny_llama_from_config
from tests.unit.test_streaming import assert_same_tensors
from tests.unit.test_streaming import spec_for as streaming_spec
from workers.pruning.allocation import scoring
from workers.pruning.allocation.streamed_scoring import first_order_scores_blockwise
from workers.pruning.models import find_towers
from workers.pruning.pipeline import run
from workers.pruning.sequential import ModelInputs
from workers.pruning.spec import (
    AllocationSpec,
    CalibrationSpec,
    EvaluationSpec,
    JobError,
    Progress,
    PruneSpec,
    Result,
)
from workers.pruning.streaming import StreamedModel

NO_EVALUATION = EvaluationSpec(perplexity=False, accuracy=False)


def spec_for(model_dir: Path, dataset: Path, allocation: AllocationSpec, **overrides: Any) -> PruneSpec:
    return streaming_spec(model_dir, dataset, **{"allocation": allocation, "evaluation": NO_EVALUATION, **overrides})


class BlockReads:
    """Every block read from the files while the job is in its scoring stage, by module path: StreamedModel's own
    materialise, counted when it finds the block still on `meta` (a read, not a no-op)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.stage = ""
        self.count: Counter[str] = Counter()
        original = StreamedModel.materialise
        reads = self

        def materialise(streamed: StreamedModel, module: nn.Module, prefix: str, recurse: bool = True) -> None:
            is_block = any(module is block for _, block in streamed.blocks)
            if reads.stage == "scoring" and is_block and any(p.is_meta for p in module.parameters()):
                reads.count[prefix] += 1
            original(streamed, module, prefix, recurse)

        monkeypatch.setattr(StreamedModel, "materialise", materialise)

    def on_progress(self, progress: Progress) -> None:
        self.stage = progress.stage


def both_ways(spec: PruneSpec, tmp: Path, reads: BlockReads, **streamed: Any) -> tuple[Result, Result]:
    """The job in memory and streamed; the same output tensors and the same allocation."""
    in_memory = run(spec, tmp / "memory")
    result = run(replace(spec, offload="disk", **streamed), tmp / "disk", on_progress=reads.on_progress)
    assert_same_tensors(tmp / "disk", tmp / "memory")
    assert same_allocation(result) == same_allocation(in_memory)
    assert result.metrics["sparsity"] == in_memory.metrics["sparsity"]
    assert result.metrics["memory"]["mode"] == "disk"
    return in_memory, result


def same_allocation(result: Result) -> dict[str, Any]:
    """metrics["allocation"] without the time scoring took, and every group's score and sparsity."""
    info = {key: value for key, value in result.metrics["allocation"].items() if key != "scoring_s"}
    return {**info, "groups": result.report["allocation"]["groups"]}


def blocks_of(result: Result) -> int:
    return result.report["model"]["num_blocks"]


# --- ECoFLaP zeroth order ----------------------------------------------------------------------------------


@pytest.mark.parametrize("perturbation", ["tensor", "block"])
def test_zeroth_order_streamed_equals_in_memory_reading_each_block_once(
        perturbation: str, tiny_llama_dir: Path, small_text: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    allocation = AllocationSpec(name="ecoflap-zeroth", num_samples=2, seq_len=16, perturbation=perturbation)
    reads = BlockReads(monkeypatch)
    _, streamed = both_ways(spec_for(tiny_llama_dir, small_text, allocation), tmp_path, reads)
    # No memory budget: every branch lives at once, one pass, each block read once (the capture stops before
    # block 0, the head runs with the blocks stubbed).
    count = blocks_of(streamed)
    assert reads.count == Counter({f"model.layers.{index}": 1 for index in range(count)})
    assert len({group["sparsity"] for group in streamed.report["allocation"]["groups"]}) > 1  # not uniform


@pytest.mark.parametrize(("perturbation", "units_per_block"), [("tensor", 7), ("block", 1)])
def test_zeroth_order_under_a_tiny_budget_runs_a_pass_per_unit(perturbation: str, units_per_block: int,
                                                               tiny_llama_dir: Path, small_text: Path,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A budget of 0 MB leaves room for one unit's branches at a time: a pass per unit, from its block to the last
    (the first from block 0, where the first unit is anyway): unit u of block k costs count - k reads."""
    allocation = AllocationSpec(name="ecoflap-zeroth", num_samples=2, seq_len=16, perturbation=perturbation)
    reads = BlockReads(monkeypatch)
    _, streamed = both_ways(spec_for(tiny_llama_dir, small_text, allocation), tmp_path, reads, memory_budget_mb=0)
    count = blocks_of(streamed)
    assert sum(reads.count.values()) == sum(units_per_block * (count - k) for k in range(count))
    # Block k is read by the passes of every unit in blocks 0..k.
    assert reads.count == Counter({f"model.layers.{k}": units_per_block * (k + 1) for k in range(count)})


def test_zeroth_order_streamed_smollm2_equals_in_memory(smollm2_dir: Path, small_text: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # One scoring sample of 16 tokens: 30 units, two head passes each over SmolLM2's 49k-token vocabulary.
    allocation = AllocationSpec(name="ecoflap-zeroth", num_samples=1, seq_len=16, perturbation="block")
    spec = spec_for(smollm2_dir, small_text, allocation,
                    calibration=CalibrationSpec(dataset=str(small_text), num_samples=2, seq_len=32))
    reads = BlockReads(monkeypatch)
    _, streamed = both_ways(spec, tmp_path, reads)
    assert reads.count == Counter({f"model.layers.{index}": 1 for index in range(30)})


def test_zeroth_order_streamed_clip_equals_in_memory(tiny_model: Callable[[str], Path], small_text: Path,
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two towers: each scored with the other stubbed by its dense final states."""
    allocation = AllocationSpec(name="ecoflap-zeroth", num_samples=8)
    reads = BlockReads(monkeypatch)
    both_ways(spec_for(tiny_model("clip"), small_text, allocation), tmp_path, reads)
    # Each tower: one dense pass (its final states, for the other's head) and one scoring pass; capturing the text
    # tower runs the vision tower first (CLIP's forward does), one batch of 8: its blocks read once more.
    assert reads.count == Counter({**{f"vision_model.encoder.layers.{k}": 3 for k in range(2)},
                                   **{f"text_model.encoder.layers.{k}": 2 for k in range(2)}})


def test_zeroth_and_first_order_refuse_llava_streamed(tiny_model: Callable[[str], Path], small_text: Path,
                                                      tmp_path: Path) -> None:
    for name in ("ecoflap-zeroth", "ecoflap-first"):
        with pytest.raises(JobError) as info:
            run(spec_for(tiny_model("llava"), small_text, AllocationSpec(name=name), offload="disk"), tmp_path)
        assert info.value.code == "invalid_spec"
        assert f"allocation {name!r} does not stream for a llava model" in info.value.message


# --- OWL, DLP, alphapruning --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "granularity"), [("owl", "block"), ("owl", "layer"), ("dlp", "block"),
                                                   ("dlp", "layer"), ("alphapruning", "block")])
def test_activation_and_weight_allocations_streamed_equal_in_memory(name: str, granularity: str,
                                                                    tiny_llama_dir: Path, small_text: Path,
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    allocation = AllocationSpec(name=name, granularity=granularity, num_samples=4, seq_len=32)
    reads = BlockReads(monkeypatch)
    _, streamed = both_ways(spec_for(tiny_llama_dir, small_text, allocation), tmp_path, reads)
    # One pass over the dense model (OWL, DLP: Wanda statistics; alphapruning: the weights alone).
    assert reads.count == Counter({f"model.layers.{index}": 1 for index in range(blocks_of(streamed))})


@pytest.mark.parametrize("family", ["clip", "blip-2"])
def test_owl_streamed_on_multi_tower_models_equals_in_memory(family: str, tiny_model: Callable[[str], Path],
                                                             small_text: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    allocation = AllocationSpec(name="owl", num_samples=4)
    both_ways(spec_for(tiny_model(family), small_text, allocation), tmp_path, BlockReads(monkeypatch))


# --- ECoFLaP first order -----------------------------------------------------------------------------------


def test_first_order_block_by_block_equals_the_whole_graph() -> None:
    model = tiny_llama_from_config(layers=3)
    towers = find_towers(model)
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))
    inputs = ModelInputs({"input_ids": ids}, {"use_cache": False})
    whole = scoring.first_order_scores(model, towers, inputs)
    steps: list[tuple[int, int]] = []
    blockwise = first_order_scores_blockwise(model, towers, inputs, on_block=lambda *step: steps.append(step))
    assert list(blockwise) == list(whole) and len(whole) == 3 * 7
    for name, value in whole.items():
        assert blockwise[name] == pytest.approx(value, rel=1e-5, abs=1e-8), name
    assert steps == [(1, 3), (2, 3), (3, 3)]
    # The model is left as it was: no gradients kept, every parameter's flag as before.
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_first_order_streamed_equals_in_memory_within_rounding(tiny_llama_dir: Path, small_text: Path,
                                                               tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    allocation = AllocationSpec(name="ecoflap-first", num_samples=4, seq_len=32)
    spec = spec_for(tiny_llama_dir, small_text, allocation)
    in_memory = run(spec, tmp_path / "memory")
    reads = BlockReads(monkeypatch)
    streamed = run(replace(spec, offload="disk"), tmp_path / "disk", on_progress=reads.on_progress)
    groups = streamed.report["allocation"]["groups"]
    expected = in_memory.report["allocation"]["groups"]
    assert [g["name"] for g in groups] == [g["name"] for g in expected]
    for ours, theirs in zip(groups, expected, strict=True):
        assert ours["score"] == pytest.approx(theirs["score"], rel=1e-5)
        assert ours["sparsity"] == pytest.approx(theirs["sparsity"], abs=1e-6)
    # Every block read twice: once forward (storing its inputs), once backward.
    assert reads.count == Counter({f"model.layers.{index}": 2 for index in range(blocks_of(streamed))})
