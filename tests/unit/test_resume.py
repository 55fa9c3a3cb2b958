"""Resume: a run interrupted after some blocks and run again from its checkpoint ends bit-identical to a run
that was never interrupted, on one tower and across towers; a checkpoint of another job is ignored."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from prunekit.fixtures.demo_models import build_tiny_llama
from workers.pruning.checkpoint import Checkpoint, FolderFiles, Resume
from workers.pruning.pipeline import run
from workers.pruning.spec import CalibrationSpec, EvaluationSpec, Progress, PruneSpec, Result

NO_EVAL = EvaluationSpec(perplexity=False, accuracy=False)


class Crash(Exception):
    """Stands for the worker dying right after a block's progress event (its checkpoint already saved)."""


@pytest.fixture(scope="module")
def llama4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("models") / "tiny-llama-4"
    build_tiny_llama(dest, layers=4)
    return dest


def spec_for(model_dir: Path, dataset: Path, **overrides: Any) -> PruneSpec:
    fields: dict[str, Any] = {"model_dir": model_dir, "method": "wanda", "sparsity": 0.5,
                              "calibration": CalibrationSpec(dataset=str(dataset), num_samples=4, seq_len=32),
                              "evaluation": NO_EVAL}
    return PruneSpec(**{**fields, **overrides})


def crash_after(blocks: int, seen: list[Progress]) -> Callable[[Progress], None]:
    def on_progress(progress: Progress) -> None:
        seen.append(progress)
        if progress.stage == "pruning" and progress.done == blocks:
            raise Crash(f"after block {blocks}")
    return on_progress


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_model(ours: Path, reference: Path) -> None:
    mine, theirs = load_file(ours / "model.safetensors"), load_file(reference / "model.safetensors")
    assert mine.keys() == theirs.keys()
    different = [name for name in mine if not torch.equal(mine[name], theirs[name])]
    assert not different, different
    assert sha256(ours / "model.safetensors") == sha256(reference / "model.safetensors")


def interrupted_then_resumed(spec: PruneSpec, blocks: int, tmp: Path, every: int = 1,
                             resumed_spec: PruneSpec | None = None) -> tuple[Result, list[Resume], list[Progress]]:
    """Runs `spec` until `blocks` blocks are pruned, then `resumed_spec` (default: the same) from its checkpoint."""
    files = FolderFiles(tmp / "checkpoint")
    with pytest.raises(Crash):
        run(spec, tmp / "first", on_progress=crash_after(blocks, []),
            checkpoint=Checkpoint(files, tmp / "stage-1", every_blocks=every))
    resumes: list[Resume] = []
    progress: list[Progress] = []
    result = run(resumed_spec or spec, tmp / "second", on_progress=progress.append,
                 checkpoint=Checkpoint(files, tmp / "stage-2", every_blocks=every, on_resume=resumes.append))
    return result, resumes, progress


def pruned_blocks(progress: list[Progress]) -> list[int]:
    return [p.done for p in progress if p.stage == "pruning" and p.done > 0]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_llama_resumed_mid_tower_is_bit_identical(method: str, llama4: Path, small_text: Path,
                                                  tmp_path: Path) -> None:
    # Perplexity on: the dense model's value, measured before the interruption, must come back as it was.
    spec = spec_for(llama4, small_text, method=method, evaluation=EvaluationSpec(num_samples=2, seq_len=32))
    reference = run(spec, tmp_path / "reference")
    result, resumes, progress = interrupted_then_resumed(spec, 2, tmp_path)

    assert [(r.tower, r.block, r.done) for r in resumes] == [("language", 2, 2)]
    # The blocks' parameters and state.json only: the hidden states entering block 3 were made again from the
    # restored blocks, and the model came out the same.
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        *(f"block-{k:05d}.safetensors" for k in range(4)), "state.json"]
    assert pruned_blocks(progress) == [3, 4]  # blocks 1 and 2 were not pruned again
    assert "evaluation_dense" not in {p.stage for p in progress}
    assert_same_model(tmp_path / "second", tmp_path / "reference")
    assert result.metrics["perplexity"] == reference.metrics["perplexity"]
    assert result.metrics["sparsity"] == reference.metrics["sparsity"]
    assert result.report["checkpoint"]["resumed_from"] == {"tower": "language", "block": 2, "done": 2,
                                                           "bytes": resumes[0].size_bytes}
    assert result.report["checkpoint"]["saves"] == 2  # after blocks 3 and 4


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_llava_resumed_inside_its_second_tower_is_bit_identical(method: str, tiny_model: Callable[[str], Path],
                                                                small_text: Path, tmp_path: Path) -> None:
    spec = spec_for(tiny_model("llava"), small_text, method=method)
    reference = run(spec, tmp_path / "reference")
    # Vision's two blocks and the language tower's first: the language tower resumes at its block 1, its
    # batch arguments captured again through the restored vision tower.
    result, resumes, progress = interrupted_then_resumed(spec, 3, tmp_path)
    assert [(r.tower, r.block, r.done) for r in resumes] == [("language", 1, 3)]
    assert pruned_blocks(progress) == [4]
    assert_same_model(tmp_path / "second", tmp_path / "reference")
    assert result.metrics["sparsity"] == reference.metrics["sparsity"]


def test_blip2_resumed_inside_the_qformer_is_bit_identical(tiny_model: Callable[[str], Path], small_text: Path,
                                                           tmp_path: Path) -> None:
    # The Q-Former's blocks take the vision tower's outputs as an argument: recaptured from the restored
    # vision tower, they must equal what the interrupted run used.
    spec = spec_for(tiny_model("blip-2"), small_text, targets={"vision": 0.5, "qformer": 0.5, "language": 0.5})
    reference = run(spec, tmp_path / "reference")
    result, resumes, _ = interrupted_then_resumed(spec, 3, tmp_path)
    assert [(r.tower, r.block, r.done) for r in resumes] == [("qformer", 1, 3)]
    assert_same_model(tmp_path / "second", tmp_path / "reference")
    assert result.report["unused_layers"] == reference.report["unused_layers"]


def test_resume_at_a_tower_boundary_and_with_sparser_checkpoints(tiny_model: Callable[[str], Path],
                                                                 small_text: Path, tmp_path: Path) -> None:
    spec = spec_for(tiny_model("llava"), small_text)
    run(spec, tmp_path / "reference")
    # Saved every second block: interrupted after block 3, the checkpoint of block 2 (the vision tower done).
    _, resumes, progress = interrupted_then_resumed(spec, 3, tmp_path, every=2)
    assert [(r.tower, r.block, r.done) for r in resumes] == [("vision", 0, 2)]
    assert pruned_blocks(progress) == [3, 4]
    assert_same_model(tmp_path / "second", tmp_path / "reference")


@pytest.mark.parametrize("change", [
    {"sparsity": 0.6},
    {"method": "sparsegpt"},
    {"calibration": CalibrationSpec(num_samples=4, seq_len=32, seed=1)},
])
def test_a_checkpoint_of_another_spec_is_ignored(change: dict[str, Any], llama4: Path, small_text: Path,
                                                 tmp_path: Path) -> None:
    spec = spec_for(llama4, small_text)
    if "calibration" in change:
        change = {"calibration": replace(change["calibration"], dataset=str(small_text))}
    other = replace(spec, **change)
    run(other, tmp_path / "reference")
    _, resumes, progress = interrupted_then_resumed(spec, 2, tmp_path, resumed_spec=other)
    assert resumes == [] and pruned_blocks(progress) == [1, 2, 3, 4]
    assert_same_model(tmp_path / "second", tmp_path / "reference")


def test_a_checkpoint_of_another_model_or_with_missing_files_is_ignored(llama4: Path, small_text: Path,
                                                                        tmp_path: Path) -> None:
    spec = spec_for(llama4, small_text)
    run(spec, tmp_path / "reference")
    files = FolderFiles(tmp_path / "checkpoint")
    with pytest.raises(Crash):
        run(spec, tmp_path / "first", on_progress=crash_after(2, []), checkpoint=Checkpoint(files, tmp_path / "s1"))
    (tmp_path / "checkpoint" / "block-00001.safetensors").unlink()
    resumes: list[Resume] = []
    run(spec, tmp_path / "second", checkpoint=Checkpoint(files, tmp_path / "s2", on_resume=resumes.append))
    assert resumes == []
    assert_same_model(tmp_path / "second", tmp_path / "reference")

    copy = tmp_path / "copy"  # the same files: the same model, wherever it lies
    build_tiny_llama(copy, layers=4)
    files = FolderFiles(tmp_path / "checkpoint-2")
    with pytest.raises(Crash):
        run(spec, tmp_path / "third", on_progress=crash_after(2, []), checkpoint=Checkpoint(files, tmp_path / "s3"))
    other = tmp_path / "other"  # another seed: other weights
    build_tiny_llama(other, seed=1, layers=4)
    run(replace(spec, model_dir=other), tmp_path / "fourth",
        checkpoint=Checkpoint(files, tmp_path / "s4", on_resume=resumes.append))
    assert resumes == []
    files = FolderFiles(tmp_path / "checkpoint-3")
    with pytest.raises(Crash):
        run(spec, tmp_path / "fifth", on_progress=crash_after(2, []), checkpoint=Checkpoint(files, tmp_path / "s5"))
    run(replace(spec, model_dir=copy), tmp_path / "sixth",
        checkpoint=Checkpoint(files, tmp_path / "s6", on_resume=resumes.append))
    assert [r.done for r in resumes] == [2]
    assert_same_model(tmp_path / "sixth", tmp_path / "reference")
