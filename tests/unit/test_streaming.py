"""Streaming from disk (`offload: "disk"`): a model pruned block by block from its files to the output is the
model pruned in memory, tensor for tensor and dtype for dtype; perplexity streamed is the in-memory number; the
sharded output loads in plain transformers; a worker streams a model larger than its budget by itself, in less
memory than the model; and what cannot stream is refused readably."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from app.errors import _loc_to_param
from app.schemas import JobCreate
from workers.pruning.checkpoint import Checkpoint, FolderFiles, Resume
from workers.pruning.evaluate import perplexity
from workers.pruning.models import find_towers, load_model, save_pretrained_folder
from workers.pruning.pipeline import run
from workers.pruning.spec import (
    BudgetSpec,
    CalibrationSpec,
    EvaluationSpec,
    JobError,
    Progress,
    PruneSpec,
    RestoreSpec,
    Result,
)
from workers.pruning.streaming import StreamedModel
from workers.pruning.streaming_eval import streamed_perplexity
from workers.pruning.weights_io import INDEX_NAME, WeightFiles

REPO = Path(__file__).resolve().parents[2]
FEW = CalibrationSpec(num_samples=4, seq_len=32)
EVAL = EvaluationSpec(num_samples=3, seq_len=32)


def spec_for(model_dir: Path, dataset: Path, **overrides: Any) -> PruneSpec:
    fields: dict[str, Any] = {"model_dir": model_dir, "method": "wanda", "sparsity": 0.5,
                              "calibration": CalibrationSpec(dataset=str(dataset), num_samples=4, seq_len=32),
                              "evaluation": EVAL}
    return PruneSpec(**{**fields, **overrides})


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    with WeightFiles(folder) as files:
        return {name: files.get(name) for name in files.names()}


def assert_same_tensors(ours: Path, theirs: Path) -> None:
    mine, other = tensors(ours), tensors(theirs)
    assert mine.keys() == other.keys()
    different = [name for name in mine if mine[name].dtype != other[name].dtype or not torch.equal(mine[name],
                                                                                                    other[name])]
    assert not different, different


def both_ways(spec: PruneSpec, tmp: Path) -> tuple[Result, Result]:
    in_memory = run(spec, tmp / "memory")
    streamed = run(replace(spec, offload="disk"), tmp / "disk")
    assert_same_tensors(tmp / "disk", tmp / "memory")
    for key in ("sparsity", "perplexity", "accuracy", "tasks"):
        assert streamed.metrics.get(key) == in_memory.metrics.get(key), key
    assert streamed.metrics["memory"]["mode"] == "disk" and in_memory.metrics["memory"]["mode"] == "memory"
    return in_memory, streamed


# --- bit-identical to the in-memory path ------------------------------------------------------------------


@pytest.mark.parametrize(("method", "pattern"), [("wanda", "unstructured"), ("sparsegpt", "unstructured"),
                                                 ("sparsegpt", "2:4"), ("magnitude", "unstructured")])
def test_streamed_llama_is_bit_identical_to_in_memory(method: str, pattern: str, tiny_llama_dir: Path,
                                                      small_text: Path, tmp_path: Path) -> None:
    in_memory, streamed = both_ways(spec_for(tiny_llama_dir, small_text, method=method, pattern=pattern), tmp_path)
    assert streamed.metrics["sparsity"]["achieved"] == 0.5
    assert set(streamed.metrics["perplexity"]) == {"dense", "pruned"}
    # Blocks were written while they were pruned: saving had nothing left to do.
    assert {"config.json", "tokenizer.json", "generation_config.json"} <= {p.name for p in (tmp_path / "disk")
                                                                           .iterdir()}


@pytest.mark.parametrize(("family", "method", "pattern"), [("clip", "wanda", "unstructured"),
                                                           ("clip", "sparsegpt", "2:4"),
                                                           ("llava", "sparsegpt", "unstructured")])
def test_streamed_two_tower_models_are_bit_identical(family: str, method: str, pattern: str,
                                                     tiny_model: Callable[[str], Path], small_text: Path,
                                                     tmp_path: Path) -> None:
    # LLaVA's language tower is calibrated through its pruned vision tower: read back from the output.
    in_memory, streamed = both_ways(spec_for(tiny_model(family), small_text, method=method, pattern=pattern),
                                    tmp_path)
    assert streamed.metrics["sparsity"]["per_tower"] == in_memory.metrics["sparsity"]["per_tower"]
    assert set(streamed.metrics["sparsity"]["per_tower"]) == {"vision", "language"}
    if family == "clip":
        assert "accuracy" in streamed.metrics  # zero-shot, streamed module by module
        assert (tmp_path / "disk" / "preprocessor_config.json").is_file()


def test_streamed_task_accuracy_equals_in_memory(tiny_model: Callable[[str], Path], small_text: Path,
                                                 tmp_path: Path) -> None:
    # BLIP-2 scores tasks with its inner language model, run on its own: streamed module by module.
    evaluation = EvaluationSpec(num_samples=2, seq_len=32, tasks=("builtin:wiki-next-sentence",), task_num_samples=4)
    _, streamed = both_ways(spec_for(tiny_model("blip-2"), small_text, evaluation=evaluation), tmp_path)
    assert set(streamed.metrics["tasks"]["builtin:wiki-next-sentence"]) == {"dense", "pruned", "n"}


def test_streamed_smollm2_with_tied_head_is_bit_identical(smollm2_dir: Path, small_text: Path,
                                                          tmp_path: Path) -> None:
    # SmolLM2's lm_head is its embed_tokens, absent from the files: read under the embeddings' name.
    spec = spec_for(smollm2_dir, small_text, calibration=CalibrationSpec(dataset=str(small_text), num_samples=2,
                                                                         seq_len=32),
                    evaluation=EvaluationSpec(num_samples=2, seq_len=32))
    _, streamed = both_ways(spec, tmp_path)
    assert "lm_head.weight" not in tensors(tmp_path / "disk")
    assert streamed.metrics["memory"]["model_mb"] > 500  # 135M parameters in fp32


class Crash(Exception):
    """Stands for the worker dying right after a block's progress event (its checkpoint, if any, saved)."""


def crash_after(blocks: int) -> Callable[[Progress], None]:
    def on_progress(progress: Progress) -> None:
        if progress.stage == "pruning" and progress.done == blocks:
            raise Crash
    return on_progress


def test_resumed_streamed_run_is_bit_identical(tiny_model: Callable[[str], Path], small_text: Path,
                                               tmp_path: Path) -> None:
    """Interrupted inside LLaVA's language tower and run again: the checkpoint holds the output's own shards (no
    copy of any block), byte for byte those of an uninterrupted run, and they go back into the new output."""
    # A shard size below one block's bytes: every block ends a shard, so every block is a resume point.
    spec = spec_for(tiny_model("llava"), small_text, method="sparsegpt", offload="disk", output_shard_bytes=1)
    run(spec, tmp_path / "reference")
    files = FolderFiles(tmp_path / "checkpoint")

    with pytest.raises(Crash):
        run(spec, tmp_path / "first", on_progress=crash_after(3),
            checkpoint=Checkpoint(files, tmp_path / "stage-1"))
    saved = sorted(path.name for path in (tmp_path / "checkpoint").iterdir())
    assert not [name for name in saved if name.startswith("block-")], saved
    shards = [name for name in saved if name.startswith("output-")]
    assert shards
    for name in shards:
        assert (tmp_path / "checkpoint" / name).read_bytes() == \
            (tmp_path / "reference" / name.removeprefix("output-")).read_bytes()
    resumes: list[Resume] = []
    progress: list[Progress] = []
    run(spec, tmp_path / "second", on_progress=progress.append,
        checkpoint=Checkpoint(files, tmp_path / "stage-2", on_resume=resumes.append))
    assert [(r.tower, r.block, r.done) for r in resumes] == [("language", 1, 3)]
    assert [p.done for p in progress if p.stage == "pruning" and p.done > 0] == [4]
    assert_same_tensors(tmp_path / "second", tmp_path / "reference")
    for shard in (tmp_path / "reference").glob("model-*.safetensors"):
        assert (tmp_path / "second" / shard.name).read_bytes() == shard.read_bytes()


def test_a_streamed_checkpoint_is_saved_where_an_output_shard_ends(tmp_path: Path, small_text: Path) -> None:
    """Shards of two blocks each: progress is saved after blocks 2, 4 and 6 (each pointing at the shard just
    completed, uploaded once), so a run stopped after block 5 resumes after block 4; the checkpoint wrote the
    blocks' bytes once, not twice; and the publishing step finds every block's shard in the checkpoint."""
    from prunekit.fixtures.demo_models import build_tiny_llama

    build_tiny_llama(tmp_path / "llama6", layers=6)
    with WeightFiles(tmp_path / "llama6") as files:
        block = sum(files.info(name).nbytes for name in files.names() if name.startswith("model.layers.0."))
    spec = spec_for(tmp_path / "llama6", small_text, offload="disk", output_shard_bytes=2 * block + block // 2)
    files = FolderFiles(tmp_path / "checkpoint")

    with pytest.raises(Crash):
        run(spec, tmp_path / "first", on_progress=crash_after(5),
            checkpoint=Checkpoint(files, tmp_path / "stage-1"))
    # Shards 1-3 hold two blocks each; the embeddings and head come after them.
    count = len(list((tmp_path / "first").glob("model-*-of-*.safetensors")))
    shard = [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
    assert sorted(p.name for p in (tmp_path / "checkpoint").glob("output-*")) == [f"output-{s}" for s in shard[:2]]
    resumes: list[Resume] = []
    checkpoint = Checkpoint(files, tmp_path / "stage-2", on_resume=resumes.append)
    result = run(spec, tmp_path / "second", checkpoint=checkpoint)
    assert [r.done for r in resumes] == [4]
    summary = result.report["checkpoint"]
    assert summary["saves"] == 1  # after the last block (6): its shard complete
    assert summary["output_shards"] == 3  # two restored, one saved by this run
    state = (tmp_path / "checkpoint" / "state.json").stat().st_size  # and no hidden states: they are made again
    assert summary["bytes_written"] == (tmp_path / "second" / shard[2]).stat().st_size + state
    held = checkpoint.stored_output(tmp_path / "second")
    assert sorted(held) == shard[:3]
    assert all(saved.sha256 == hashlib.sha256((tmp_path / "second" / name).read_bytes()).hexdigest()
               for name, saved in held.items())
    # The shards after them (embeddings, norm, head) are written after the last block and never checkpointed.
    reference = run(spec, tmp_path / "reference")
    assert reference.metrics["sparsity"] == result.metrics["sparsity"]
    assert_same_tensors(tmp_path / "second", tmp_path / "reference")


# --- perplexity --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "llava", "blip-2"])
def test_streamed_perplexity_equals_in_memory(family: str, tiny_model: Callable[[str], Path]) -> None:
    from workers.pruning.multimodal import perplexity_model

    folder = tiny_model(family)
    # 7 windows in batches of 3: the last batch is smaller, as in a real evaluation.
    windows = torch.randint(5, 900, (7, 32), generator=torch.Generator().manual_seed(0))
    expected = perplexity(perplexity_model(load_model(folder).model), windows, 3)
    streamed = StreamedModel(folder, torch.device("cpu"))
    language = next(t for t in find_towers(streamed.model) if t.name == "language")
    blocks = [(f"{language.prefix}.{i}", block) for i, block in enumerate(language.blocks)]
    assert streamed_perplexity(streamed, perplexity_model(streamed.model), blocks, windows, 3) == expected
    assert all(p.is_meta for p in streamed.model.parameters())  # everything read was released


# --- the output ----------------------------------------------------------------------------------------------


def test_bf16_in_bf16_out_in_both_modes(tiny_llama_dir: Path, small_text: Path, tmp_path: Path) -> None:
    loaded = load_model(tiny_llama_dir)
    save_pretrained_folder(loaded.model.to(torch.bfloat16), loaded.tokenizer, tmp_path / "bf16")
    # SparseGPT updates the weights it keeps: pruned in fp32, saved (and fed on) as bf16 in both modes.
    both_ways(spec_for(tmp_path / "bf16", small_text, method="sparsegpt"), tmp_path)
    saved = tensors(tmp_path / "disk")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert saved["model.layers.0.mlp.up_proj.weight"].eq(0).float().mean() == 0.5


def test_sharded_output_loads_in_plain_transformers(tiny_llama_dir: Path, small_text: Path, tmp_path: Path) -> None:
    spec = spec_for(tiny_llama_dir, small_text, output_shard_bytes=200_000, evaluation=EvaluationSpec(
        perplexity=False))
    run(spec, tmp_path / "memory")
    run(replace(spec, offload="disk"), tmp_path / "disk")
    for mode in ("memory", "disk"):
        index = json.loads((tmp_path / mode / INDEX_NAME).read_text())
        assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / mode / "model.safetensors").exists()
    assert_same_tensors(tmp_path / "disk", tmp_path / "memory")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "disk").eval()
    state = saved.state_dict()
    pruned = tensors(tmp_path / "disk")
    assert all(torch.equal(state[name], value) for name, value in pruned.items())
    assert state["model.layers.1.self_attn.q_proj.weight"].eq(0).float().mean() == 0.5
    ids = torch.randint(5, 900, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.isfinite(saved(ids).logits).all()


# --- the worker's choice -------------------------------------------------------------------------------------

_OVER_BUDGET = """
import json, sys
from pathlib import Path
import torch
from transformers import AutoTokenizer
from workers.pruning.synthetic import write_synthetic_llama
from workers.pruning.pipeline import run
from workers.pruning.spec import CalibrationSpec, EvaluationSpec, PruneSpec

tiny, text, folder, out = (Path(arg) for arg in sys.argv[1:5])
model = write_synthetic_llama(folder, 50e6, torch.float32, AutoTokenizer.from_pretrained(tiny))
def rss_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
def spec(model, **fields):
    return PruneSpec(model, "wanda", 0.5, calibration=CalibrationSpec(dataset=str(text), num_samples=4, seq_len=32),
                     evaluation=EvaluationSpec(num_samples=2, seq_len=32), **fields)
# A small job first: what any job costs once (the libraries it imports, the tokenizer, the data) is paid before.
run(spec(tiny, offload="disk"), out.with_name("warm-up"))
before = rss_mb()
events, after_blocks = [], []
def on_progress(event):
    events.append(event)
    if event.stage == "pruning" and event.done > 0:
        after_blocks.append(rss_mb())
result = run(spec(folder, memory_budget_mb=50), out, on_progress=on_progress)
print(json.dumps({"before_mb": before, "model_bytes": model.num_bytes, "memory": result.metrics["memory"],
                  "perplexity": result.metrics["perplexity"], "messages": [e.message for e in events],
                  "after_blocks_mb": after_blocks}))
"""


def test_a_model_over_the_budget_streams_by_itself_in_less_memory_than_it_has(tiny_llama_dir: Path,
                                                                               small_text: Path,
                                                                               tmp_path: Path) -> None:
    # A process of its own: its peak resident memory is this job's alone.
    done = subprocess.run([sys.executable, "-c", _OVER_BUDGET, str(tiny_llama_dir), str(small_text),
                           str(tmp_path / "synthetic"), str(tmp_path / "out")], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    memory = facts["memory"]
    assert memory["mode"] == "disk" and memory["chosen_by"] == "worker" and memory["budget_mb"] == 50
    assert memory["model_mb"] * 2**20 >= facts["model_bytes"] > 180 * 2**20
    assert any(m.startswith("Streaming from disk: the model (") and "exceeds this worker's memory budget (50 MB)"
               in m for m in facts["messages"])
    # A block (13 MB) and what pruning it takes, the embeddings and head (5 MB), the activations, and the math
    # libraries' buffers for these shapes: far less than the model, which in memory alone would add 187 MB.
    growth_mb = memory["peak_rss_mb"] - facts["before_mb"]
    assert growth_mb < 0.6 * facts["model_bytes"] / 2**20, (growth_mb, memory)
    # And nothing piles up from block to block: memory is flat in the number of blocks.
    after_blocks = facts["after_blocks_mb"]
    assert len(after_blocks) >= 4 and max(after_blocks) - min(after_blocks) < 16, after_blocks
    assert all(value is not None for value in facts["perplexity"].values())
    assert (tmp_path / "out" / "config.json").is_file()


def test_a_restore_job_that_would_stream_fails_saying_so(tiny_llama_dir: Path, small_text: Path,
                                                         tmp_path: Path) -> None:
    with pytest.raises(JobError) as info:
        run(spec_for(tiny_llama_dir, small_text, restore=RestoreSpec(), memory_budget_mb=0), tmp_path / "out")
    assert info.value.code == "invalid_spec"
    assert "restore" in info.value.message and "streamed from disk" in info.value.message


@pytest.mark.parametrize(("overrides", "words"), [
    ({"budget": BudgetSpec(max_perplexity_ratio=1.5)}, "a quality budget does not stream yet"),
    ({"restore": RestoreSpec()}, "restore cannot be combined with offload 'disk'"),
])
def test_what_cannot_stream_is_refused_before_loading(overrides: dict[str, Any], words: str, tiny_llama_dir: Path,
                                                      small_text: Path, tmp_path: Path) -> None:
    with pytest.raises(JobError) as info:
        run(spec_for(tiny_llama_dir, small_text, offload="disk", **overrides), tmp_path / "out")
    assert info.value.code == "invalid_spec" and words in info.value.message


def test_a_gguf_model_cannot_stream(tmp_path: Path, small_text: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(JobError) as info:
        run(spec_for(tmp_path / "model", small_text, offload="disk"), tmp_path / "out")
    assert info.value.code == "invalid_spec" and "GGUF" in info.value.message


# --- the API and the runner ------------------------------------------------------------------------------


def job(**fields: Any) -> dict[str, Any]:
    return {"model": "local:tiny-llama", "method": "wanda", "sparsity": 0.5, **fields}


@pytest.mark.parametrize(("offload", "stored", "mode"), [(False, False, "memory"), (True, "cpu", "cpu"),
                                                         ("cpu", "cpu", "cpu"), ("disk", "disk", "disk")])
def test_offload_values_reach_the_engine_by_one_name(offload: Any, stored: Any, mode: str, tmp_path: Path) -> None:
    from prunekit.core.config import Settings
    from workers.job_spec import build_spec

    request = JobCreate.model_validate(job(offload=offload)).model_dump(mode="json")
    assert request["offload"] == stored
    settings = Settings(PRUNEKIT_VAR_DIR=tmp_path, WORKER_MEMORY_BUDGET_MB=8192, OUTPUT_SHARD_MB=512)
    spec = build_spec(request, tmp_path, settings)
    assert (spec.offload, spec.memory_budget_mb, spec.output_shard_bytes) == (mode, 8192, 512 * 2**20)


def test_the_default_budget_is_a_share_of_the_memory_available(tmp_path: Path) -> None:
    from prunekit.core.config import Settings
    from workers.job_spec import build_spec

    spec = build_spec(job(), tmp_path, Settings(PRUNEKIT_VAR_DIR=tmp_path))
    available = next(int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemAvailable:"))
    assert spec.memory_budget_mb is not None and 0.3 * available < spec.memory_budget_mb < 0.9 * available


@pytest.mark.parametrize("offload", [True, "cpu", "disk"])
def test_api_refuses_restore_with_any_offload_naming_restore(offload: Any) -> None:
    with pytest.raises(ValidationError) as info:
        JobCreate.model_validate(job(restore={}, offload=offload))
    errors = info.value.errors()
    assert len(errors) == 1 and _loc_to_param(("body", *errors[0]["loc"])) == "restore"


def test_a_streamed_sweep_writes_each_sparsity_like_in_memory(tiny_llama_dir: Path, small_text: Path,
                                                              tmp_path: Path) -> None:
    spec = spec_for(tiny_llama_dir, small_text, sweep=(0.3, 0.5))
    in_memory = run(spec, tmp_path / "memory")
    streamed = run(replace(spec, offload="disk"), tmp_path / "disk")
    for folder in ("sparsity-0.3", "sparsity-0.5"):
        assert_same_tensors(tmp_path / "disk" / folder, tmp_path / "memory" / folder)
    assert streamed.metrics["sweep"] == in_memory.metrics["sweep"]
