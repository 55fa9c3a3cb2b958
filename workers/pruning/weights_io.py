"""Reading and writing safetensors one tensor at a time, so that a model larger than memory can go from disk to
disk block by block.

`WeightFiles` reads a model folder's tensors (one `model.safetensors`, several `*.safetensors`, or the Hugging Face
sharded layout with `model.safetensors.index.json`) from memory-mapped files, one tensor at a time.

`ShardedWriter` writes the Hugging Face sharded layout. The whole layout is planned up front from each tensor's
(name, dtype, shape), so every shard's header and size are known before the first tensor arrives: a tensor's bytes
go straight to their place in their file (in any order), and nothing holds a shard in memory. A journal beside the
shards records each tensor written, so that a writer reopened after an interruption (`ShardedWriter.resume`) keeps
what was already written.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# The writer's sidecars, removed by a successful close(): hidden, so no model loader looks at them.
PLAN_NAME = ".shards-plan.json"
JOURNAL_NAME = ".shards-journal"
_HEADER_LIMIT = 100 * 2**20  # safetensors' own bound on a header; a bigger "length" is a corrupt file

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


class IncompleteWrite(RuntimeError):
    """close() was called before every planned tensor was written."""

    def __init__(self, missing: Sequence[str]) -> None:
        self.missing = list(missing)
        shown = ", ".join(self.missing[:10]) + (f" and {len(self.missing) - 10} more" if len(self.missing) > 10
                                                 else "")
        super().__init__(f"{len(self.missing)} tensor(s) not written: {shown}")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int

    @classmethod
    def of(cls, name: str, dtype: torch.dtype, shape: Sequence[int]) -> TensorInfo:
        """nbytes computed from the dtype and shape."""
        return cls(name, dtype, tuple(int(s) for s in shape), _nbytes(dtype, shape))


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count * torch.empty((), dtype=dtype).element_size()


# --- reading -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    info: TensorInfo
    file: Path


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(where the data section starts, the JSON header) of a safetensors file, reading only the header."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path.name} is not a safetensors file (shorter than 8 bytes)")
        length = int.from_bytes(head, "little")
        if length > _HEADER_LIMIT:
            raise ValueError(f"{path.name} is not a safetensors file (header length {length})")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: the safetensors header is not a JSON object")
    return 8 + length, header


class WeightFiles:
    """A model folder's tensors (one model.safetensors, several *.safetensors, or the HF sharded layout with
    model.safetensors.index.json), read one tensor at a time from memory-mapped files: never the whole model."""

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        self.folder = folder
        if folder.is_file():
            files = [folder]
        elif (folder / INDEX_NAME).is_file():
            index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
            files = [folder / name for name in dict.fromkeys(sorted(index["weight_map"].values()))]
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {folder}")
        self._entries: dict[str, _Entry] = {}
        for path in files:
            _, header = read_header(path)
            tensors = sorted(((name, spec) for name, spec in header.items() if name != "__metadata__"),
                             key=lambda item: item[1]["data_offsets"][0])
            for name, spec in tensors:
                if name in self._entries:
                    raise ValueError(f"tensor {name} is in both {self._entries[name].file.name} and {path.name}")
                if spec["dtype"] not in DTYPES:
                    raise ValueError(f"{path.name}: tensor {name} has the unsupported dtype {spec['dtype']}")
                begin, end = spec["data_offsets"]
                info = TensorInfo(name, DTYPES[spec["dtype"]], tuple(spec["shape"]), end - begin)
                self._entries[name] = _Entry(info, path)

    def names(self) -> list[str]:
        return list(self._entries)

    def info(self, name: str) -> TensorInfo:
        return self._entry(name).info

    def file_of(self, name: str) -> Path:
        return self._entry(name).file

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """A tensor of its own (not a view on the mapped file), on device, cast to dtype when given."""
        from safetensors import safe_open

        entry = self._entry(name)
        # Opened for each tensor: an open handle keeps the file mapped, and every page read through it would stay
        # in the process's resident set until close; this way a tensor's pages leave with it.
        with safe_open(entry.file, framework="pt") as handle:
            mapped = handle.get_tensor(name)  # a view on a mapping of the file: only this tensor's pages are read
        # copy=True: one copy (the cast and the move folded in) that owns its memory, so releasing it frees it; the
        # mapping goes with the view.
        return mapped.to(device=device, dtype=dtype or mapped.dtype, copy=True)

    def total_bytes(self) -> int:
        return sum(entry.info.nbytes for entry in self._entries.values())

    def close(self) -> None:
        """Nothing stays open between reads; kept so that callers can release a WeightFiles explicitly."""

    def __enter__(self) -> WeightFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.folder}") from None


# --- writing -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Placed:
    info: TensorInfo
    file: str
    offset: int  # absolute, in the file


@dataclass(frozen=True)
class _Shard:
    name: str
    header: bytes  # the 8-byte length and the padded JSON header
    size: int  # the whole file
    tensors: tuple[str, ...]


def plan_shards(layout: Sequence[TensorInfo], shard_bytes: int,
                units: Sequence[Sequence[str]] = ()) -> list[list[TensorInfo]]:
    """Tensors in order, into shards of at most shard_bytes each; a tensor larger than that gets a shard of its
    own. `units`: groups of tensors (consecutive in the layout) that a shard never splits from each other (one
    block's tensors), unless the group alone is larger than a shard; then it gets shards of its own. A shard holds
    units or tensors outside them, never both: each shard of units is complete, and final, as soon as its last unit
    is written."""
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be positive, not {shard_bytes}")
    unit_of = {name: number for number, unit in enumerate(units) for name in unit}
    pieces: list[list[TensorInfo]] = []  # the units in layout order; a tensor outside every unit is one alone
    for info in layout:
        number = unit_of.get(info.name)
        if pieces and number is not None and unit_of.get(pieces[-1][-1].name) == number:
            pieces[-1].append(info)
        else:
            pieces.append([info])
    shards: list[list[TensorInfo]] = []
    current: list[TensorInfo] = []
    size = 0
    for piece in pieces:
        piece_bytes = sum(info.nbytes for info in piece)
        in_unit = piece[0].name in unit_of
        if current and (size + piece_bytes > shard_bytes or (current[0].name in unit_of) != in_unit):
            shards.append(current)
            current, size = [], 0
        if len(piece) > 1 and piece_bytes > shard_bytes:
            shards.extend(plan_shards(piece, shard_bytes))
            continue
        current.extend(piece)
        size += piece_bytes
    if current or not shards:
        shards.append(current)
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def _shard_header(tensors: Sequence[TensorInfo]) -> tuple[bytes, dict[str, int]]:
    """The header (length + JSON padded with spaces to a multiple of 8) and each tensor's offset in the data
    section. Wider dtypes first (stable, so a one-dtype model keeps its order): every tensor then starts at a
    multiple of its element size, which torch needs to view the mapped bytes."""
    ordered = sorted(tensors, key=lambda info: -torch.empty((), dtype=info.dtype).element_size())
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offsets: dict[str, int] = {}
    position = 0
    for info in ordered:
        header[info.name] = {"dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape),
                             "data_offsets": [position, position + info.nbytes]}
        offsets[info.name] = position
        position += info.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, offsets


class ShardedWriter:
    """Writes a model's tensors in the Hugging Face sharded layout (model-0000k-of-0000n.safetensors plus
    model.safetensors.index.json; a single model.safetensors when everything fits in one shard). The layout is
    planned up front from (name, dtype, shape), headers written at once, and each tensor's bytes go straight to
    their place in its file as it is written (any order); nothing holds a shard in memory."""

    def __init__(self, folder: Path, layout: Sequence[TensorInfo], shard_bytes: int,
                 units: Sequence[Sequence[str]] = ()) -> None:
        folder = Path(folder)
        names = [info.name for info in layout]
        if len(set(names)) != len(names):
            raise ValueError("the layout names a tensor twice")
        for info in layout:
            if info.dtype not in DTYPE_NAMES:
                raise ValueError(f"tensor {info.name}: the dtype {info.dtype} cannot be written to safetensors")
            if info.nbytes != _nbytes(info.dtype, info.shape):
                raise ValueError(f"tensor {info.name}: nbytes {info.nbytes} does not match {info.dtype} "
                                 f"{list(info.shape)}")
        folder.mkdir(parents=True, exist_ok=True)
        groups = plan_shards(layout, shard_bytes, units)
        shards: list[_Shard] = []
        placed: dict[str, _Placed] = {}
        for file, group in zip(shard_names(len(groups)), groups, strict=True):
            header, offsets = _shard_header(group)
            size = len(header) + sum(info.nbytes for info in group)
            shards.append(_Shard(file, header, size, tuple(info.name for info in group)))
            placed.update({info.name: _Placed(info, file, len(header) + offsets[info.name]) for info in group})
        # Shards of an earlier layout in the same folder would be read as part of this model.
        for stale in [*folder.glob("model-*-of-*.safetensors"), folder / SINGLE_NAME, folder / INDEX_NAME]:
            stale.unlink(missing_ok=True)
        (folder / JOURNAL_NAME).unlink(missing_ok=True)
        total = sum(shard.size for shard in shards)
        free = shutil.disk_usage(folder).free
        if free < total:
            # The files are sparse until written: without this the disk would fill up halfway through a prune.
            raise OSError(errno.ENOSPC, f"No space left: {folder} has {free / 2**20:.1f} MB free and the model "
                                        f"needs {total / 2**20:.1f} MB")
        for shard in shards:
            fd = os.open(folder / shard.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _pwrite_all(fd, memoryview(shard.header), 0)
                os.ftruncate(fd, shard.size)  # the whole size at once: every tensor is written at its place
            finally:
                os.close(fd)
        plan = {"shard_bytes": shard_bytes, "units": [list(unit) for unit in units],
                "layout": [{"name": info.name, "dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape)}
                           for info in layout]}
        _write_atomically(folder / PLAN_NAME, json.dumps(plan).encode("utf-8"))
        self._open(folder, list(layout), shards, placed, set())

    def _open(self, folder: Path, layout: list[TensorInfo], shards: list[_Shard], placed: dict[str, _Placed],
              written: set[str]) -> None:
        self.folder = folder
        self.layout = layout
        self._shards = shards
        self._placed = placed
        self._written = written

    @classmethod
    def resume(cls, folder: Path) -> ShardedWriter:
        """After an interruption: the same plan, and what was written stays written."""
        folder = Path(folder)
        plan_path = folder / PLAN_NAME
        if not plan_path.is_file():
            raise FileNotFoundError(f"no unfinished sharded write in {folder} ({PLAN_NAME} missing)")
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
        layout = [TensorInfo.of(item["name"], DTYPES[item["dtype"]], item["shape"]) for item in plan["layout"]]
        groups = plan_shards(layout, int(plan["shard_bytes"]), plan.get("units", []))
        shards: list[_Shard] = []
        placed: dict[str, _Placed] = {}
        for file, group in zip(shard_names(len(groups)), groups, strict=True):
            header, offsets = _shard_header(group)
            size = len(header) + sum(info.nbytes for info in group)
            path = folder / file
            # The plan is recomputed, so its files must be the ones this plan made.
            if not path.is_file() or path.stat().st_size != size or _read_prefix(path, len(header)) != header:
                raise ValueError(f"{path} does not match the sharded write planned in {folder}")
            shards.append(_Shard(file, header, size, tuple(info.name for info in group)))
            placed.update({info.name: _Placed(info, file, len(header) + offsets[info.name]) for info in group})
        journal = folder / JOURNAL_NAME
        lines = journal.read_text(encoding="utf-8").split("\n") if journal.is_file() else []
        # The last element is "" after a complete line, or a line cut short by the interruption: dropped either way.
        written = {line for line in lines[:-1] if line in placed}
        writer = cls.__new__(cls)
        writer._open(folder, layout, shards, placed, written)
        return writer

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Casts to the planned dtype (the shape must match) and writes the bytes at their place; durable when it
        returns."""
        target = self._placed.get(name)
        if target is None:
            raise KeyError(f"tensor {name!r} is not in the planned layout")
        if tuple(tensor.shape) != target.info.shape:
            raise ValueError(f"tensor {name}: shape {list(tensor.shape)}, planned {list(target.info.shape)}")
        data = tensor.detach().to(device="cpu", dtype=target.info.dtype).contiguous()
        # A uint8 view of the same memory (numpy has no bf16; uint8 bytes are the same for every dtype).
        raw = data.reshape(-1).view(torch.uint8).numpy()
        fd = os.open(self.folder / target.file, os.O_WRONLY)
        try:
            _pwrite_all(fd, memoryview(raw), target.offset)
            # The data reaches the disk before the journal says so: a journaled tensor survives a crash.
            os.fdatasync(fd)
        finally:
            os.close(fd)
        if name not in self._written:
            with (self.folder / JOURNAL_NAME).open("a", encoding="utf-8") as journal:
                journal.write(name + "\n")
                journal.flush()
                os.fsync(journal.fileno())
            self._written.add(name)

    def written(self) -> set[str]:
        return set(self._written)

    def files(self) -> list[Path]:
        """The planned shard files, in order."""
        return [self.folder / shard.name for shard in self._shards]

    def file_of(self, name: str) -> Path:
        return self.folder / self._placed[name].file

    def complete_files(self) -> list[Path]:
        """The shards whose every tensor is written (final from then on: nothing writes to them again)."""
        return [self.folder / shard.name for shard in self._shards if self._written.issuperset(shard.tensors)]

    def adopt(self, path: Path) -> bool:
        """A complete shard of this very plan written elsewhere (a checkpoint's copy, fetched back) moved into place,
        its tensors then written. False, and nothing moved, when the file is not the planned shard of its name (same
        header, same size): its tensors must then be written one by one."""
        shard = next((shard for shard in self._shards if shard.name == path.name), None)
        if shard is None or path.stat().st_size != shard.size or _read_prefix(path, len(shard.header)) != shard.header:
            return False
        shutil.move(path, self.folder / shard.name)  # a rename on one file system
        with (self.folder / JOURNAL_NAME).open("a", encoding="utf-8") as journal:
            journal.write("".join(f"{name}\n" for name in shard.tensors if name not in self._written))
            journal.flush()
            os.fsync(journal.fileno())
        self._written.update(shard.tensors)
        return True

    def close(self) -> list[Path]:
        """The shards, then the index when there is more than one shard. Raises IncompleteWrite naming the tensors
        not written (and stays open, so they can still be written)."""
        missing = [info.name for info in self.layout if info.name not in self._written]
        if missing:
            raise IncompleteWrite(missing)
        files = self.files()
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(info.nbytes for info in self.layout)},
                     "weight_map": {name: self._placed[name].file for name in sorted(self._placed)}}
            _write_atomically(self.folder / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode("utf-8"))
            files.append(self.folder / INDEX_NAME)
        (self.folder / PLAN_NAME).unlink(missing_ok=True)
        (self.folder / JOURNAL_NAME).unlink(missing_ok=True)
        return files


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    # One pwrite writes at most ~2 GiB on Linux: loop until every byte is out.
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _read_prefix(path: Path, count: int) -> bytes:
    with path.open("rb") as f:
        return f.read(count)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
