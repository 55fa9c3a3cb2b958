"""weights_io: safetensors read and written one tensor at a time, checked against safetensors' and transformers' own
readers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.unit.conftest import tiny_llama_from_config
from workers.pruning.weights_io import (
    INDEX_NAME,
    JOURNAL_NAME,
    PLAN_NAME,
    IncompleteWrite,
    ShardedWriter,
    TensorInfo,
    WeightFiles,
    plan_shards,
)


def _tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = {"embed": (50, 16), "a.weight": (16, 16), "a.bias": (16,), "b.weight": (40, 16), "norm": (16,),
              "scalar": (), "head": (50, 16)}
    return {name: torch.randn(shape, generator=generator).to(dtype) for name, shape in shapes.items()}


def _layout(tensors: dict[str, torch.Tensor]) -> list[TensorInfo]:
    return [TensorInfo.of(name, t.dtype, t.shape) for name, t in tensors.items()]


def _write_shuffled(folder: Path, tensors: dict[str, torch.Tensor], shard_bytes: int) -> list[Path]:
    writer = ShardedWriter(folder, _layout(tensors), shard_bytes)
    names = list(tensors)
    random.Random(1).shuffle(names)
    for name in names:
        writer.write(name, tensors[name])
    return writer.close()


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    files = [folder / "model.safetensors"] if (folder / "model.safetensors").exists() else sorted(
        folder.glob("model-*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for path in files:
        out.update(load_file(path))
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_files_read_back_bit_identically(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = _tensors(dtype)
    element = tensors["embed"].element_size()
    # Shards of 1000 elements: embed (800) alone, since a.weight (256) would overflow it; then a.weight, a.bias,
    # b.weight, norm and scalar (256 + 16 + 640 + 16 + 1 = 929); then head (800).
    files = _write_shuffled(tmp_path, tensors, shard_bytes=1000 * element)

    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shards = [p for p in files if p.name != INDEX_NAME]
    assert [p.name for p in shards] == [f"model-0000{k}-of-00003.safetensors" for k in range(1, 4)]
    assert [sorted(n for n, f in index["weight_map"].items() if f == p.name) for p in shards] == [
        ["embed"], ["a.bias", "a.weight", "b.weight", "norm", "scalar"], ["head"]]
    assert files[-1] == tmp_path / INDEX_NAME
    assert index["metadata"]["total_size"] == sum(t.numel() * element for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    assert not (tmp_path / PLAN_NAME).exists() and not (tmp_path / JOURNAL_NAME).exists()

    loaded = _read_all(tmp_path)
    assert set(loaded) == set(tensors)
    weights = WeightFiles(tmp_path)
    assert weights.names() == list(tensors)  # file order: the shards follow the layout
    for name, tensor in tensors.items():
        assert loaded[name].dtype == dtype
        assert _same_bits(loaded[name], tensor)
        got = weights.get(name)
        assert got.dtype == dtype and _same_bits(got, tensor)
        assert weights.info(name) == TensorInfo.of(name, dtype, tensor.shape)
    assert weights.total_bytes() == index["metadata"]["total_size"]


def test_get_returns_a_tensor_of_its_own_cast_when_asked(tmp_path: Path) -> None:
    tensors = _tensors(torch.bfloat16)
    _write_shuffled(tmp_path, tensors, shard_bytes=2**20)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / INDEX_NAME).exists()
    weights = WeightFiles(tmp_path)
    got = weights.get("a.weight")
    got.zero_()  # writable, and writing to it leaves the file alone
    assert torch.equal(weights.get("a.weight"), tensors["a.weight"])
    as_fp32 = weights.get("a.weight", dtype=torch.float32)
    assert as_fp32.dtype == torch.float32 and torch.equal(as_fp32, tensors["a.weight"].float())
    assert "a.weight" in weights and "missing" not in weights
    with pytest.raises(KeyError, match="missing"):
        weights.get("missing")
    weights.close()


def test_plan_respects_shard_bytes() -> None:
    layout = [TensorInfo.of(f"t{i}", torch.float32, (n,)) for i, n in enumerate([10, 10, 30, 5, 100, 1, 1])]
    # Shards of at most 40 floats = 160 bytes; the 100-float tensor is larger and gets a shard of its own.
    shards = plan_shards(layout, shard_bytes=160)
    assert [[info.name for info in shard] for shard in shards] == [["t0", "t1"], ["t2", "t3"], ["t4"], ["t5", "t6"]]
    for shard in shards:
        assert len(shard) == 1 or sum(info.nbytes for info in shard) <= 160


def test_plan_never_splits_a_unit_unless_it_is_larger_than_a_shard() -> None:
    sizes = {"e": 30, "b0.q": 10, "b0.k": 10, "b1.q": 5, "b1.k": 5, "b2.q": 50, "b2.k": 30, "b3.q": 1, "n": 1}
    layout = [TensorInfo.of(name, torch.float32, (n,)) for name, n in sizes.items()]
    units = [["b0.q", "b0.k"], ["b1.q", "b1.k"], ["b2.q", "b2.k"], ["b3.q"]]
    # 40 floats a shard. e (30) and b0.q (10) would fit together by size, but b0.q goes with b0.k; blocks 0 and 1
    # (30) share one; block 2 (80) is larger than a shard and is split by tensor into shards of its own; b3 and n
    # would fit together, but a shard of units takes nothing else (it must be complete once its units are).
    shards = plan_shards(layout, shard_bytes=160, units=units)
    assert [[info.name for info in shard] for shard in shards] == [
        ["e"], ["b0.q", "b0.k", "b1.q", "b1.k"], ["b2.q"], ["b2.k"], ["b3.q"], ["n"]]
    assert [[info.name for info in shard] for shard in plan_shards(layout, shard_bytes=160)] == [
        ["e", "b0.q"], ["b0.k", "b1.q", "b1.k"], ["b2.q"], ["b2.k", "b3.q", "n"]]


def test_a_shard_is_complete_once_its_tensors_are_written_and_can_be_adopted_elsewhere(tmp_path: Path) -> None:
    tensors = _tensors(torch.float32)
    units = [["a.weight", "a.bias"], ["b.weight"]]
    # 1500 bytes a shard: embed | a.weight a.bias | b.weight | norm scalar | head
    first = ShardedWriter(tmp_path / "first", _layout(tensors), shard_bytes=1500, units=units)
    first.write("a.weight", tensors["a.weight"])
    assert first.complete_files() == []
    first.write("a.bias", tensors["a.bias"])
    [done] = first.complete_files()
    assert done.name == "model-00002-of-00005.safetensors" and first.file_of("a.bias") == done

    second = ShardedWriter(tmp_path / "second", _layout(tensors), shard_bytes=1500, units=units)
    saved = tmp_path / "saved" / done.name
    saved.parent.mkdir()
    saved.write_bytes(done.read_bytes())
    assert second.adopt(saved) and not saved.exists()
    assert second.written() == {"a.weight", "a.bias"}
    assert ShardedWriter.resume(tmp_path / "second").written() == {"a.weight", "a.bias"}  # journaled

    # Another plan with a shard of the same name (a.bias stored as bf16): not adopted, nothing moved.
    layout = [TensorInfo.of(info.name, torch.bfloat16 if info.name == "a.bias" else info.dtype, info.shape)
              for info in _layout(tensors)]
    other = ShardedWriter(tmp_path / "other", layout, shard_bytes=1500, units=units)
    saved.write_bytes(done.read_bytes())
    assert not other.adopt(saved) and saved.exists() and other.written() == set()

    for writer in (first, second):
        for name in tensors:
            if name not in writer.written():
                writer.write(name, tensors[name])
    mine, theirs = first.close(), second.close()
    assert [path.read_bytes() for path in mine] == [path.read_bytes() for path in theirs]


def test_tiny_llama_written_in_shards_loads_in_transformers(tmp_path: Path) -> None:
    model = tiny_llama_from_config()
    state = model.state_dict()
    folder = tmp_path / "sharded"
    model.config.save_pretrained(folder)
    files = _write_shuffled(folder, dict(state), shard_bytes=64 * 1024)
    assert len(files) > 3  # several shards and the index

    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_resume_completes_the_same_files(tmp_path: Path) -> None:
    tensors = _tensors(torch.float32)
    names = list(tensors)
    writer = ShardedWriter(tmp_path / "resumed", _layout(tensors), shard_bytes=4000)
    for name in names[::2]:
        writer.write(name, tensors[name])
    del writer  # the process that wrote them is gone

    resumed = ShardedWriter.resume(tmp_path / "resumed")
    assert resumed.written() == set(names[::2])
    for name in names:
        if name not in resumed.written():
            resumed.write(name, tensors[name])
    files = resumed.close()

    _write_shuffled(tmp_path / "direct", tensors, shard_bytes=4000)
    for path in files:
        assert path.read_bytes() == (tmp_path / "direct" / path.name).read_bytes()


def test_close_names_missing_tensors_and_stays_open(tmp_path: Path) -> None:
    tensors = _tensors(torch.float32)
    writer = ShardedWriter(tmp_path, _layout(tensors), shard_bytes=2**20)
    for name in tensors:
        if name != "norm":
            writer.write(name, tensors[name])
    with pytest.raises(IncompleteWrite, match="1 tensor.*norm"):
        writer.close()
    writer.write("norm", tensors["norm"])
    assert writer.close() == [tmp_path / "model.safetensors"]


def test_write_refuses_a_wrong_shape_and_unknown_names_and_casts(tmp_path: Path) -> None:
    writer = ShardedWriter(tmp_path, [TensorInfo.of("w", torch.bfloat16, (2, 3))], shard_bytes=2**20)
    with pytest.raises(ValueError, match=r"shape \[3, 2\], planned \[2, 3\]"):
        writer.write("w", torch.zeros(3, 2))
    with pytest.raises(KeyError, match="other"):
        writer.write("other", torch.zeros(2, 3))
    value = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    writer.write("w", value)  # fp32 in, the planned bf16 out
    writer.close()
    assert torch.equal(load_file(tmp_path / "model.safetensors")["w"], value.to(torch.bfloat16))


def test_weight_files_reads_an_hf_sharded_folder(tmp_path: Path) -> None:
    model = tiny_llama_from_config()
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / INDEX_NAME).is_file()
    weights = WeightFiles(tmp_path)
    state = model.state_dict()
    assert set(weights.names()) == set(state)
    assert len({weights.file_of(name) for name in weights.names()}) > 1
    for name, tensor in state.items():
        assert torch.equal(weights.get(name), tensor)


def test_mixed_dtypes_in_one_shard_stay_aligned(tmp_path: Path) -> None:
    # 3 int8 bytes before a float32 would put it at an odd offset; wider dtypes go first within a shard.
    tensors = {"mask": torch.tensor([1, -2, 3], dtype=torch.int8), "w": torch.randn(5),
               "h": torch.randn(3).to(torch.float16)}
    _write_shuffled(tmp_path, tensors, shard_bytes=2**20)
    loaded = load_file(tmp_path / "model.safetensors")
    weights = WeightFiles(tmp_path)
    for name, tensor in tensors.items():
        assert _same_bits(loaded[name], tensor) and _same_bits(weights.get(name), tensor)


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_reading_every_tensor_keeps_only_the_one_held(tmp_path: Path) -> None:
    # 4 tensors of 40 MB: reading them all, one at a time, must not leave the files' pages in the resident set.
    layout = [TensorInfo.of(f"t{i}", torch.float32, (10_000_000,)) for i in range(4)]
    writer = ShardedWriter(tmp_path, layout, shard_bytes=100 * 2**20)
    for i in range(4):
        writer.write(f"t{i}", torch.full((10_000_000,), float(i)))
    writer.close()
    weights = WeightFiles(tmp_path)
    before = _rss_mb()
    for i, name in enumerate(weights.names()):
        tensor = weights.get(name)
        assert tensor[-1].item() == i
        del tensor
    assert _rss_mb() - before < 60  # the model is 160 MB
