"""Checkpoints of the block-by-block driver, so that a job run again after a crash resumes where it stopped.

After a block is pruned, what is needed to carry on exactly is written as files: the parameters of the blocks
finished since the last save, and state.json, which lists them and names the job they belong to (a fingerprint of
the spec, the model's and dataset's contents, device, dtype and library versions). state.json is written last: a
crash halfway through a save leaves the previous state.json, which still names complete files. The hidden states
entering the next block are not saved: the resumed run makes them again by carrying the calibration data through
the restored blocks (sequential._block_inputs), which costs a forward pass over them where saving would cost the
states' bytes at every save (4.3 GB for a 7B model calibrated on 128 windows of 2,048 tokens).

A model held in memory has its finished blocks saved as one safetensors file per block, written once. A model
streamed from disk has already written them to its output: the checkpoint points at the output's shards instead
(WrittenOutput), saving each once when it is complete (a shard never splits blocks, streaming.start_output) and
saving progress only at such a boundary. The shards it holds are the pruned model's own files, so the publishing
step may copy them within the store instead of uploading them again (stored_output).

Where the files live is the caller's business (CheckpointFiles): a local folder here, an artifact-store
prefix in the worker. The format stays in this module so that every backend reads and writes the same one.
No pickles: safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from workers.pruning.files import write_whole
from workers.pruning.models import Tower
from workers.pruning.spec import WORKER_FIELDS, PruneSpec, spec_record

log = logging.getLogger("prunekit.engine")

FORMAT = 3  # bump when the files' layout or meaning changes: older checkpoints are then ignored
STATE = "state.json"
SHARD_PREFIX = "output-"  # a saved output shard's file name: the prefix and the shard's own name


class CheckpointError(Exception):
    """A storage failure that costs a checkpoint, never the job: the run carries on without it."""


class CheckpointFiles(Protocol):
    """Flat named files somewhere. put() must replace a file whole (readers never see half of one) and returns the
    sha256 of the bytes it stored."""

    def put(self, name: str, path: Path) -> str: ...
    def get(self, name: str, dest: Path) -> bool: ...  # False when there is no such file


@dataclass(frozen=True)
class FolderFiles:
    """Checkpoint files in a local folder (tests, notebooks, a single machine)."""

    root: Path

    def put(self, name: str, path: Path) -> str:
        digest = hashlib.sha256()

        def copy(tmp: Path) -> None:
            with path.open("rb") as source, tmp.open("wb") as dest:
                while chunk := source.read(2**20):
                    digest.update(chunk)
                    dest.write(chunk)

        write_whole(self.root / name, copy)
        return digest.hexdigest()

    def get(self, name: str, dest: Path) -> bool:
        if not (self.root / name).is_file():
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.root / name, dest)
        return True



@dataclass(frozen=True)
class BlockDone:
    """What the driver reports after each block: enough to continue from the block after it."""

    tower: Tower
    index: int  # the block just pruned, within its tower
    done: int  # blocks pruned so far over all towers of the plan
    total: int
    unused: list[str]  # full names of the layers calibration never reached, so far


class WrittenOutput(Protocol):
    """The output a streamed model is written to block by block (streaming.StreamedModel)."""

    def complete_shards(self) -> list[Path]: ...  # shards whose every tensor is written: final from then on
    def block_shards(self, tower: Tower, index: int) -> list[Path]: ...  # the shards holding the block's parameters


@dataclass(frozen=True)
class SavedShard:
    """An output shard held by the checkpoint: the pruned model's own file, byte for byte."""

    name: str  # the checkpoint's file
    sha256: str
    size_bytes: int
    header_sha256: str  # of the safetensors header: which tensors, where (the plan that made it)


@dataclass
class Resume:
    """A checkpoint that matches this job: the driver skips the first `done` blocks of the plan."""

    done: int
    tower: str  # where work continues, for messages
    block: int
    weight_files: list[Path]  # parameters of the finished blocks by full name, one local file per block
    output_shards: list[Path]  # a streamed run's: its output's shards that hold the finished blocks, by their names
    unused: list[str]
    extra: dict[str, Any]  # the caller's JSON state (e.g. the dense model's metrics)
    size_bytes: int


@dataclass
class Checkpoint:
    files: CheckpointFiles
    scratch: Path  # a local folder where files are staged on their way in and out
    every_blocks: int = 1
    on_resume: Callable[[Resume], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # saved with every state.json
    # A streamed run's output: finished blocks are pointed at there, never copied.
    output: WrittenOutput | None = None
    _fingerprint: dict[str, Any] = field(default_factory=dict, init=False)
    _saved_blocks: list[str] = field(default_factory=list, init=False)
    _shards: dict[str, SavedShard] = field(default_factory=dict, init=False)  # by the output shard's name
    _saved_done: int = field(default=0, init=False)
    # Finished blocks not written yet: (tower, index, plan-wide number). Their parameters are read when saved;
    # a finished block is never touched again.
    _pending: list[tuple[Tower, int, int]] = field(default_factory=list, init=False)
    _stats: dict[str, Any] = field(default_factory=lambda: {"saves": 0, "bytes_written": 0, "seconds": 0.0,
                                                              "failed_saves": 0}, init=False)

    def load(self, fingerprint: dict[str, Any]) -> Resume | None:
        """The saved progress of this very job, or None (nothing saved, another job's, unreadable)."""
        self._fingerprint = fingerprint
        try:
            resume = self._read(fingerprint)
        except Exception as exc:  # a checkpoint is an optimisation: whatever is wrong with it, start afresh
            log.warning("ignoring an unreadable checkpoint: %s: %s", type(exc).__name__, exc)
            resume = None
        if resume is not None:
            self._stats["resumed_from"] = {"tower": resume.tower, "block": resume.block, "done": resume.done,
                                           "bytes": resume.size_bytes}
            if self.on_resume is not None:
                self.on_resume(resume)
        return resume

    def _read(self, fingerprint: dict[str, Any]) -> Resume | None:
        folder = self.scratch / "in"
        if not self.files.get(STATE, folder / STATE):
            return None
        state = json.loads((folder / STATE).read_text(encoding="utf-8"))
        if state.get("fingerprint") != fingerprint:
            log.warning("ignoring a checkpoint of a different job spec, model, data or environment")
            return None
        size = (folder / STATE).stat().st_size
        shards = {name: SavedShard(**saved) for name, saved in state["shards"].items()}
        # A shard comes back under its own name: the output adopts it by name.
        wanted = [*((name, folder / name) for name in state["blocks"]),
                  *((saved.name, folder / "output" / name) for name, saved in shards.items())]
        for name, dest in wanted:
            if not self.files.get(name, dest):
                raise CheckpointError(f"state.json names {name}, which is missing")
            size += dest.stat().st_size
        self._saved_blocks, self._shards = list(state["blocks"]), shards
        self._saved_done = state["done"]
        self.extra = state["extra"]
        return Resume(state["done"], state["tower"], state["block"], [folder / name for name in state["blocks"]],
                      [folder / "output" / name for name in shards], state["unused"], state["extra"], size)

    def after_block(self, event: BlockDone) -> None:
        """Called by the driver after every block; saves once `every_blocks` blocks have been pruned since the last
        save, and after the last block; a streamed run waits for the end of the output shard it is in."""
        self._pending.append((event.tower, event.index, event.done - 1))
        if event.done != event.total and event.done - self._saved_done < max(self.every_blocks, 1):
            return
        if self.output is not None and not self._pending_shards_complete():
            return  # a streamed run saves at the end of an output shard: its blocks are then in a final file
        start = time.perf_counter()
        try:
            written = self._save(event)
        except (OSError, CheckpointError) as exc:
            # Pending blocks stay pending: the next save writes them, with a state.json that names them.
            self._stats["failed_saves"] += 1
            log.warning("checkpoint after block %d not saved: %s", event.done, exc)
            return
        self._stats["saves"] += 1
        self._stats["bytes_written"] += written
        self._stats["seconds"] = round(self._stats["seconds"] + time.perf_counter() - start, 3)

    def _save(self, event: BlockDone) -> int:
        folder = self.scratch / "out"
        folder.mkdir(parents=True, exist_ok=True)
        written = 0

        def put(name: str, write: Callable[[Path], None]) -> None:
            nonlocal written
            path = folder / name
            write(path)
            written += path.stat().st_size
            self.files.put(name, path)
            path.unlink()

        if self.output is not None:
            written += self._save_shards()
        else:
            for tower, index, number in self._pending:
                name = f"block-{number:05d}.safetensors"
                tensors = {f"{tower.prefix}.{index}.{key}": value.detach().cpu().contiguous()
                           for key, value in tower.blocks[index].named_parameters()}
                put(name, lambda path, tensors=tensors: save_file(tensors, str(path)))  # type: ignore[misc]
                if name not in self._saved_blocks:
                    self._saved_blocks.append(name)
        last = event.index + 1 == len(event.tower.blocks)
        state = {"format": FORMAT, "fingerprint": self._fingerprint, "done": event.done,
                 "tower": event.tower.name, "block": 0 if last else event.index + 1,
                 "blocks": self._saved_blocks, "shards": {name: vars(saved) for name, saved in self._shards.items()},
                 "unused": event.unused, "extra": self.extra}
        put(STATE, lambda path: path.write_text(json.dumps(state, sort_keys=True), encoding="utf-8"))
        self._pending.clear()
        self._saved_done = event.done
        return written

    def _pending_shards(self) -> set[Path]:
        assert self.output is not None
        return {path for tower, index, _ in self._pending for path in self.output.block_shards(tower, index)}

    def _pending_shards_complete(self) -> bool:
        assert self.output is not None
        return self._pending_shards() <= set(self.output.complete_shards())

    def _save_shards(self) -> int:
        """The complete output shards of the pending blocks not saved yet, each uploaded from its place once."""
        written = 0
        for path in sorted(self._pending_shards()):
            if path.name in self._shards:
                continue
            name = f"{SHARD_PREFIX}{path.name}"
            size = path.stat().st_size
            digest = self.files.put(name, path)
            self._shards[path.name] = SavedShard(name, digest, size, header_digest(path))
            written += size
        return written

    def stored_output(self, folder: Path) -> dict[str, SavedShard]:
        """The files of a finished output folder that this checkpoint holds byte for byte, by their names there:
        the publishing step copies them within the store instead of uploading them again. A file is recognised by
        its size and its safetensors header (its tensors and their places): a shard's bytes are decided by those and
        the job, which the fingerprint pins."""
        held: dict[str, SavedShard] = {}
        for name, saved in self._shards.items():
            local = folder / name
            if local.is_file() and local.stat().st_size == saved.size_bytes and header_digest(local) == \
                    saved.header_sha256:
                held[name] = saved
        return held

    def summary(self) -> dict[str, Any]:
        """For the report: how much checkpointing wrote and cost, and where this run resumed from."""
        held = {"output_shards": len(self._shards)} if self.output is not None else {}
        return {"every_blocks": self.every_blocks, **self._stats, **held}


def header_digest(path: Path) -> str:
    """sha256 of a safetensors file's header (its length prefix included)."""
    with path.open("rb") as fh:
        head = fh.read(8)
        return hashlib.sha256(head + fh.read(int.from_bytes(head, "little"))).hexdigest()


def restore(model: torch.nn.Module, resume: Resume) -> None:
    """Writes the finished blocks' saved parameters into the model, one block's file at a time."""
    with torch.no_grad():
        for path in resume.weight_files:
            for name, tensor in load_file(path).items():
                model.get_parameter(name).copy_(tensor)
            path.unlink(missing_ok=True)


def fingerprint(spec: PruneSpec, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Everything that decides the pruned weights (and the dense metrics saved with them), as plain JSON.

    Paths are replaced by digests of their contents: a worker fetches models and datasets into a folder of
    its own attempt, so the same job sees different paths on each attempt and a model re-imported under the
    same name must not match.
    """
    import transformers

    plain = json.loads(json.dumps(spec_record(spec), default=str))
    for name in WORKER_FIELDS:  # the worker's settings: they decide no weight
        plain.pop(name, None)
    # Restoration runs after pruning and is not checkpointed: it does not decide the pruned weights (and its
    # dataset is a path of the attempt's own scratch folder).
    plain.pop("restore", None)
    plain["model_dir"] = digest_path(Path(spec.model_dir))
    dataset = Path(spec.calibration.dataset)
    if dataset.exists():
        plain["calibration"]["dataset"] = digest_path(dataset)
    return json.loads(json.dumps({"format": FORMAT, "spec": plain, "device": device.type, "dtype": str(dtype),
                                  "torch": torch.__version__, "transformers": transformers.__version__},
                                 sort_keys=True))


def digest_path(path: Path) -> str:
    """sha256 over the relative names and contents of a file or of every file under a folder."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() if file != path else b"")
        digest.update(b"\0")
        with file.open("rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return f"sha256:{digest.hexdigest()}"
