"""Checkpoints of the block-by-block driver, so that a job run again after a crash resumes where it stopped.

After a block is pruned, what is needed to carry on exactly is written as files: the parameters of the blocks
finished since the last save (one safetensors file per block, written once), the hidden states entering the
next block (safetensors), and state.json, which lists them and names the job they belong to (a fingerprint of
the spec, the model's and dataset's contents, device, dtype and library versions). state.json is written last:
a crash halfway through a save leaves the previous state.json, which still names complete files.

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

FORMAT = 1  # bump when the files' layout or meaning changes: older checkpoints are then ignored
STATE = "state.json"


class CheckpointError(Exception):
    """A storage failure that costs a checkpoint, never the job: the run carries on without it."""


class CheckpointFiles(Protocol):
    """Flat named files somewhere. put() must replace a file whole (readers never see half of one)."""

    def put(self, name: str, path: Path) -> None: ...
    def get(self, name: str, dest: Path) -> bool: ...  # False when there is no such file
    def delete(self, name: str) -> None: ...


@dataclass(frozen=True)
class FolderFiles:
    """Checkpoint files in a local folder (tests, notebooks, a single machine)."""

    root: Path

    def put(self, name: str, path: Path) -> None:
        write_whole(self.root / name, lambda tmp: shutil.copyfile(path, tmp))

    def get(self, name: str, dest: Path) -> bool:
        if not (self.root / name).is_file():
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.root / name, dest)
        return True

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)


@dataclass(frozen=True)
class BlockDone:
    """What the driver reports after each block: enough to continue from the block after it."""

    tower: Tower
    index: int  # the block just pruned, within its tower
    done: int  # blocks pruned so far over all towers of the plan
    total: int
    hidden: torch.Tensor | None  # inputs of the tower's next block; None at a tower's end or without statistics
    unused: list[str]  # full names of the layers calibration never reached, so far


@dataclass
class Resume:
    """A checkpoint that matches this job: the driver skips the first `done` blocks of the plan."""

    done: int
    tower: str  # where work continues, for messages
    block: int
    weight_files: list[Path]  # parameters of the finished blocks by full name, one local file per block
    hidden: torch.Tensor | None  # inputs of `block` when it is not the first of its tower
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
    # A finished block's parameters by full name, as saved: by default read from the model; a model streamed from
    # disk has released them, and they are read back from the output they were written to.
    block_tensors: Callable[[Tower, int], dict[str, torch.Tensor]] | None = None
    _fingerprint: dict[str, Any] = field(default_factory=dict, init=False)
    _saved_blocks: list[str] = field(default_factory=list, init=False)
    # Finished blocks not written yet: (tower, index, plan-wide number). Their parameters are read when saved;
    # a finished block is never touched again.
    _pending: list[tuple[Tower, int, int]] = field(default_factory=list, init=False)
    _hidden: str | None = field(default=None, init=False)
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
        for name in [*state["blocks"], *([state["hidden"]] if state["hidden"] else [])]:
            if not self.files.get(name, folder / name):
                raise CheckpointError(f"state.json names {name}, which is missing")
            size += (folder / name).stat().st_size
        hidden = load_file(folder / state["hidden"])["hidden"] if state["hidden"] else None
        self._saved_blocks, self._hidden = list(state["blocks"]), state["hidden"]
        self.extra = state["extra"]
        return Resume(state["done"], state["tower"], state["block"], [folder / name for name in state["blocks"]],
                      hidden, state["unused"], state["extra"], size)

    def after_block(self, event: BlockDone) -> None:
        """Called by the driver after every block; saves every `every_blocks` blocks and after the last one."""
        self._pending.append((event.tower, event.index, event.done - 1))
        if event.done % max(self.every_blocks, 1) and event.done != event.total:
            return
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

        for tower, index, number in self._pending:
            name = f"block-{number:05d}.safetensors"
            tensors = (self.block_tensors(tower, index) if self.block_tensors is not None else
                       {f"{tower.prefix}.{index}.{key}": value.detach().cpu().contiguous()
                        for key, value in tower.blocks[index].named_parameters()})
            put(name, lambda path, tensors=tensors: save_file(tensors, str(path)))  # type: ignore[misc]
            if name not in self._saved_blocks:
                self._saved_blocks.append(name)
        hidden = None
        if event.hidden is not None:
            hidden = f"hidden-{event.done:05d}.safetensors"
            states = event.hidden.detach().cpu().contiguous()
            put(hidden, lambda path: save_file({"hidden": states}, str(path)))
        last = event.index + 1 == len(event.tower.blocks)
        state = {"format": FORMAT, "fingerprint": self._fingerprint, "done": event.done,
                 "tower": event.tower.name, "block": 0 if last else event.index + 1,
                 "blocks": self._saved_blocks, "hidden": hidden, "unused": event.unused, "extra": self.extra}
        put(STATE, lambda path: path.write_text(json.dumps(state, sort_keys=True), encoding="utf-8"))
        self._pending.clear()
        previous, self._hidden = self._hidden, hidden
        if previous and previous != hidden:
            self.files.delete(previous)  # only once the new state.json no longer names it
        return written

    def summary(self) -> dict[str, Any]:
        """For the report: how much checkpointing wrote and cost, and where this run resumed from."""
        return {"every_blocks": self.every_blocks, **self._stats}


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
