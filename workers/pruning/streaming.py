"""Streaming a model from its files (`offload: "disk"`), for models larger than the worker's memory.

The model is transformers' module tree built from config.json with every parameter on the `meta` device: it
takes no memory. A module's parameters are read from the safetensors files when it is needed (memory-mapped, one
tensor at a time, straight onto the job's device and cast to the compute dtype) and put back on `meta` after.

While pruning, each block is read from the input, pruned, written to the output (ShardedWriter, in the input's
dtype) and released before the next is read (DiskHome, the sequential driver's home of blocks); what runs before a
tower's first block (embeddings, an earlier tower already pruned) runs module by module under hooks that read each
module from the output when it is written there and from the input otherwise. Everything that is not pruned is
copied to the output tensor by tensor at the end.

Memory: about one block, plus the calibration activations, plus the modules outside the blocks that a pass keeps
(embeddings, final norm, head).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.vocabulary import OFFLOAD_DISK, UNIFORM
from workers.pruning.allocation.streamed_scoring import streams
from workers.pruning.checkpoint import Resume
from workers.pruning.files import open_to_readers
from workers.pruning.models import (
    MULTIMODAL_CLASSES,
    LoadedModel,
    Tower,
    block_linears,
    checkpoint_names,
    copy_folder_files,
    find_towers,
    folder_tokenizer,
    model_class,
    model_type_of,
    weight_matrix,
)
from workers.pruning.multimodal import CAUSAL_LM
from workers.pruning.spec import JobError, PruneSpec
from workers.pruning.weights_io import ShardedWriter, TensorInfo, WeightFiles

MB = 2**20


# --- whether a job streams ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryChoice:
    """Where the job's model lives, and why: metrics["memory"] (with the peaks measured at the end)."""

    mode: str  # one of OFFLOAD_MODES
    chosen_by: str  # "job": the request's offload; "worker": the model exceeds the worker's memory budget
    budget_mb: int | None
    model_mb: int | None  # the model's bytes as loaded for compute; None where they cannot be told beforehand

    def record(self) -> dict[str, Any]:
        return {"mode": self.mode, "chosen_by": self.chosen_by, "budget_mb": self.budget_mb, "model_mb": self.model_mb}

    def message(self) -> str:
        assert self.model_mb is not None and self.budget_mb is not None
        return (f"Streaming from disk: the model ({_gb(self.model_mb)} as loaded) exceeds this worker's memory "
                f"budget ({_gb(self.budget_mb)}).")


def _gb(mb: int) -> str:
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb} MB"


def choose_memory(spec: PruneSpec, device: torch.device) -> MemoryChoice:
    """The job's offload, or "disk" when a job left in memory (or in CPU memory) has a model larger than the
    worker's budget. Refuses, readably, what cannot stream: restoration, GGUF files, the zeroth- and first-order
    allocations of LLaVA and BLIP-2, and quality budgets (for now)."""
    model_mb = model_megabytes(Path(spec.model_dir), device)
    budget = spec.memory_budget_mb
    if spec.offload == OFFLOAD_DISK:
        choice = MemoryChoice(OFFLOAD_DISK, "job", budget, model_mb)
    elif budget is not None and model_mb is not None and model_mb > budget:
        choice = MemoryChoice(OFFLOAD_DISK, "worker", budget, model_mb)
        if spec.restore is not None:
            raise JobError("invalid_spec", f"The model ({_gb(model_mb)} as loaded) exceeds this worker's memory "
                                           f"budget ({_gb(budget)}) and would have to be streamed from disk, but "
                                           "restore trains the whole model at once and cannot stream: run the job "
                                           "without restore, or on a worker with more memory.")
    else:
        choice = MemoryChoice(spec.offload, "job", budget, model_mb)
    if choice.mode == OFFLOAD_DISK:
        _check_streams(spec, choice)
    return choice


def _check_streams(spec: PruneSpec, choice: MemoryChoice) -> None:
    why = ("the model exceeds this worker's memory budget, so it is streamed from disk" if choice.chosen_by == "worker"
           else 'offload "disk" streams the model from disk')
    if not (Path(spec.model_dir) / "config.json").is_file() or not any(Path(spec.model_dir).glob("*.safetensors")):
        raise JobError("invalid_spec", f"{why[0].upper()}{why[1:]}, which needs a Hugging Face folder of "
                                       "safetensors files; a GGUF model is loaded whole. Import it as safetensors "
                                       "first, or run it on a worker with more memory.")
    name = spec.allocation.name
    family = _family(Path(spec.model_dir))
    if name != UNIFORM and not streams(name, family):
        raise JobError("invalid_spec", f"{why[0].upper()}{why[1:]}, and allocation {name!r} does not stream for a "
                                       f"{family} model: its scores read more of one tower than the final states "
                                       "(LLaVA's inner vision layer, BLIP-2's Q-Former cross-attention). Use "
                                       "allocation owl, dlp or alphapruning, or a worker with more memory.")
    if spec.budget is not None:
        raise JobError("invalid_spec", f"{why[0].upper()}{why[1:]}, and a quality budget does not stream yet: give "
                                       "a sparsity (or use a worker with more memory).")


def _family(folder: Path) -> str:
    """multimodal's family of the model in the folder, from config.json alone."""
    model_type = config_of(folder).get("model_type")
    return model_type if model_type in MULTIMODAL_CLASSES else CAUSAL_LM


def model_megabytes(folder: Path, device: torch.device) -> int | None:
    """The model's bytes as loaded for compute (floating tensors in the compute dtype: fp32 on a CPU), from the
    files' headers alone; None for a folder whose weights are not safetensors."""
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        return _gguf_megabytes(folder)
    try:
        with WeightFiles(folder) as files:
            dtype = compute_dtype(files, device, config_of(folder))
            total = sum(_loaded_bytes(files.info(name), dtype) for name in files.names())
    except (OSError, ValueError):
        return None  # unreadable files: loading says so, in its own words
    return -(-total // MB)


def _loaded_bytes(info: TensorInfo, dtype: torch.dtype) -> int:
    if not info.dtype.is_floating_point:
        return info.nbytes
    return info.nbytes // _element_size(info.dtype) * _element_size(dtype)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _gguf_megabytes(folder: Path) -> int | None:
    """A GGUF file is dequantised to fp32 as it loads: 4 bytes per weight."""
    ggufs = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
    if len(ggufs) != 1:
        return None
    try:
        from gguf import GGUFReader

        count = sum(int(tensor.n_elements) for tensor in GGUFReader(str(ggufs[0])).tensors)
    except Exception:  # an unreadable file is loading's to report
        return None
    return -(-count * 4 // MB)


def compute_dtype(files: WeightFiles, device: torch.device, config: dict[str, Any] | None = None) -> torch.dtype:
    """What the model computes in, as load_model decides: fp32 on a CPU; on a GPU what from_pretrained's "auto"
    takes (config.json's dtype, else the files' first floating dtype), fp16 widened to fp32 (it overflows in long
    sums; bf16 has fp32's range)."""
    if device.type == "cpu":
        return torch.float32
    named = (config or {}).get("dtype") or (config or {}).get("torch_dtype")
    stored = getattr(torch, named, None) if isinstance(named, str) else None
    if not isinstance(stored, torch.dtype):
        stored = next((files.info(name).dtype for name in files.names() if files.info(name).dtype.is_floating_point),
                      torch.float32)
    return stored if stored in (torch.bfloat16, torch.float32) else torch.float32


def config_of(folder: Path) -> dict[str, Any]:
    """config.json as plain data ({} when unreadable: loading says why, in its own words)."""
    try:
        parsed = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


# --- the streamed model ------------------------------------------------------------------------------------


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


class StreamedModel:
    """A model whose weights stay in its files until a module needs them.

    `model` is the module tree with every parameter on `meta`; materialise() reads a module's parameters onto the
    device, release() puts them back. A tensor written to the output (start_output, write_module) is read from
    there from then on: after finish_output, the whole model is read from the output (the pruned model)."""

    def __init__(self, folder: Path, device: torch.device) -> None:
        import transformers
        from accelerate import init_empty_weights

        self.folder = folder
        self.device = device
        model_type = model_type_of(folder)
        self.files = WeightFiles(folder)
        self.dtype = compute_dtype(self.files, device, config_of(folder))
        try:
            config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
            cls = model_class(model_type)
            # Buffers stay real: the non-persistent ones (rotary inv_freq, position ids) are computed, not loaded.
            with init_empty_weights(include_buffers=False):
                model = (cls.from_config(config, dtype=self.dtype, trust_remote_code=False)
                         if cls is transformers.AutoModelForCausalLM else cls._from_config(config, dtype=self.dtype))
        except Exception as exc:  # as load_model: this folder cannot be built
            raise JobError("model_load_failed", f"Could not build the model in {folder.name} from its config "
                                                f"({type(exc).__name__}: {str(exc).strip()[:300]}).") from exc
        model.tie_weights()  # as from_pretrained does: some classes (BLIP-2's inner LM) tie only here
        self.model: nn.Module = model.eval()
        self.tokenizer = folder_tokenizer(folder, model_type)
        # the model's parameter or buffer name -> its tensor in the files (tied parameters share one tensor)
        self._tensor: dict[str, str] = {}
        self._meta: dict[str, nn.Parameter] = dict(self.model.named_parameters(remove_duplicate=False))
        self._map_names()
        # every tower's blocks, by their module path: the units read and released whole
        self.blocks = [(f"{tower.prefix}.{index}", block) for tower in find_towers(self.model)
                        for index, block in enumerate(tower.blocks)]
        self._pinned: set[str] = set()
        self._writer: ShardedWriter | None = None
        self._written: set[str] = set()
        self._output: Path | None = None
        self._output_files: WeightFiles | None = None

    def loaded_model(self) -> LoadedModel:
        return LoadedModel(self.model, self.tokenizer, "hf", self.folder)

    def _map_names(self) -> None:
        for tensor, target in checkpoint_names(self.model, self.files.names()).items():
            self._tensor[target] = tensor
        with torch.no_grad():  # persistent buffers the files hold (few models have any) are loaded once, here
            for name, buffer in list(self.model.named_buffers()):
                owner, leaf = _owner(self.model, name)
                value = self.files.get(self._tensor[name], self.device) if name in self._tensor else buffer
                owner._buffers[leaf] = value.to(self.device)
        # A tied parameter (SmolLM2's lm_head is its embed_tokens) is one Parameter under several names; the files
        # hold it under one of them.
        by_id: dict[int, list[str]] = {}
        for name, param in self._meta.items():
            by_id.setdefault(id(param), []).append(name)
        for names in by_id.values():
            stored = [self._tensor[name] for name in names if name in self._tensor]
            if not stored:
                raise JobError("invalid_model", f"The model's files hold no tensor for {names[0]} (from_pretrained "
                                                "would initialise it at random), so it cannot be streamed.")
            for name in names:
                self._tensor.setdefault(name, stored[0])

    # -- reading and releasing

    def tensor_name(self, name: str) -> str:
        """The files' tensor behind the model's parameter (or loaded buffer) `name`."""
        return self._tensor[name]

    def module_tensors(self, module: nn.Module, prefix: str) -> list[str]:
        """The files' tensors behind the module's parameters, each once, in the module's order."""
        return list(dict.fromkeys(self._tensor[_join(prefix, local)]
                                  for local, _ in module.named_parameters(remove_duplicate=False)))

    def read(self, tensor: str) -> torch.Tensor:
        """One tensor on the device in the compute dtype (floating ones): from the output once written there."""
        files = self.files
        if tensor in self._written:
            if self._output_files is None:
                assert self._output is not None
                self._output_files = WeightFiles(self._output)
            files = self._output_files
        stored = files.info(tensor).dtype
        return files.get(tensor, self.device, self.dtype if stored.is_floating_point else None)

    def materialise(self, module: nn.Module, prefix: str, recurse: bool = True) -> None:
        """The module's parameters (its own only, without recurse) read onto the device; those already there
        stay as they are."""
        read: dict[str, nn.Parameter] = {}  # one tensor read once, however many names it has here
        # Outside inference mode: a parameter made inside it could not take part in autograd again.
        with torch.inference_mode(False), torch.no_grad():
            for local, param in list(module.named_parameters(recurse=recurse, remove_duplicate=False)):
                if not param.is_meta:
                    continue
                tensor = self._tensor[_join(prefix, local)]
                if tensor not in read:
                    read[tensor] = nn.Parameter(self.read(tensor), requires_grad=False)
                owner, leaf = _owner(module, local)
                owner._parameters[leaf] = read[tensor]

    def release(self, module: nn.Module, prefix: str, recurse: bool = True) -> None:
        """The module's parameters back on `meta` (pinned ones stay until unpinned)."""
        for local, _param in list(module.named_parameters(recurse=recurse, remove_duplicate=False)):
            name = _join(prefix, local)
            if name in self._pinned:
                continue
            owner, leaf = _owner(module, local)
            owner._parameters[leaf] = self._meta[name]

    @contextlib.contextmanager
    def loaded(self, module: nn.Module, prefix: str) -> Iterator[nn.Module]:
        self.materialise(module, prefix)
        try:
            yield module
        finally:
            self.release(module, prefix)

    def block(self, tower: Tower, index: int) -> contextlib.AbstractContextManager[nn.Module]:
        """One block of a tower read for the duration (the unit a block-major pass over the model asks for)."""
        return self.loaded(tower.blocks[index], f"{tower.prefix}.{index}")

    @contextlib.contextmanager
    def forward(self, skip: Collection[nn.Module] = (), parts: Sequence[nn.Module] = ()) -> Iterator[None]:
        """The model runs as if loaded: every block is read as it is called and released after; every other module
        with parameters (embeddings, norms, head, projector) is read when first called and kept until the end, so
        that a pass over many batches reads it once. `skip`: blocks left as they are (the caller's business).

        The first parameter of the model, and of each of `parts` (BLIP-2's language model, run on its own), is read
        at once and kept: code that asks a model for its device and dtype (next(model.parameters())) then gets the
        real ones; so are the parameters of the model itself (CLIP's logit_scale), which no forward of a submodule
        would read."""
        skipped = {id(module) for module in skip}
        kept: list[tuple[nn.Module, str]] = []
        handles = []

        def block_hooks(block: nn.Module, prefix: str) -> None:
            def before(_module: nn.Module, _args: Any) -> None:
                self.materialise(block, prefix)

            def after(_module: nn.Module, _args: Any, _out: Any) -> None:
                self.release(block, prefix)

            handles.append(block.register_forward_pre_hook(before))
            handles.append(block.register_forward_hook(after, always_call=True))

        def keep_hook(module: nn.Module, prefix: str) -> None:
            def before(_module: nn.Module, _args: Any) -> None:
                if any(param.is_meta for param in module.parameters(recurse=False)):
                    self.materialise(module, prefix, recurse=False)
                    kept.append((module, prefix))

            handles.append(module.register_forward_pre_hook(before))

        blocks = {id(block) for _, block in self.blocks}
        for prefix, block in self.blocks:
            if id(block) not in skipped:
                block_hooks(block, prefix)
        for prefix, module in self.model.named_modules():
            if id(module) in blocks or any(prefix.startswith(f"{block}.") for block, _ in self.blocks):
                continue
            if next(module.parameters(recurse=False), None) is not None:
                keep_hook(module, prefix)
        paths = {id(module): name for name, module in self.model.named_modules()}
        firsts = [_join(paths[id(part)], next(name for name, _ in part.named_parameters()))
                  for part in (self.model, *parts)]
        try:
            self.materialise(self.model, "", recurse=False)
            kept.append((self.model, ""))
            for first in firsts:
                owner, _leaf = _owner(self.model, first)
                self.materialise(owner, first.rpartition(".")[0], recurse=False)
                kept.append((owner, first.rpartition(".")[0]))
                self._pinned.add(first)
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._pinned.difference_update(firsts)
            for module, prefix in kept:
                self.release(module, prefix, recurse=False)
            for prefix, block in self.blocks:  # a pass stopped inside a block (capture) left it read
                if id(block) not in skipped:
                    self.release(block, prefix)

    # -- the output

    def start_output(self, folder: Path, shard_bytes: int, blocks: Sequence[tuple[nn.Module, str]] = ()) -> None:
        """A new output in the input's layout (the same tensors, each in the input's dtype); reads come from the
        input again until tensors are written. `blocks` (module, prefix), in the order they will be written, come
        first, and a shard never splits one from another (unless a block alone is larger than a shard): each shard
        is complete, and final, when its last block is written, so a checkpoint can point at it."""
        units = [self.module_tensors(block, prefix) for block, prefix in blocks]
        first = [name for unit in units for name in unit]
        order = list(dict.fromkeys([*first, *self.files.names()]))
        self._writer = ShardedWriter(folder, [self.files.info(name) for name in order], shard_bytes, units)
        self._output, self._output_files, self._written = folder, None, set()

    def write_module(self, module: nn.Module, prefix: str) -> None:
        """The module's parameters (read, pruned) written to the output, cast to the input's dtype."""
        assert self._writer is not None, "start_output first"
        for local, param in module.named_parameters(remove_duplicate=False):
            tensor = self._tensor[_join(prefix, local)]
            if tensor not in self._written:
                self.write_tensor(tensor, param.detach())

    def write_tensor(self, tensor: str, value: torch.Tensor) -> None:
        assert self._writer is not None, "start_output first"
        self._writer.write(tensor, value)
        self._written.add(tensor)
        self._output_files = None  # re-read the output's headers: what changed under a mapping is not relied on

    def complete_shards(self) -> list[Path]:
        """The output's shards whose every tensor is written: final, so a checkpoint may point at them."""
        assert self._writer is not None, "start_output first"
        return self._writer.complete_files()

    def block_shards(self, tower: Tower, index: int) -> list[Path]:
        """The output's shards that hold the block's parameters."""
        assert self._writer is not None, "start_output first"
        return sorted({self._writer.file_of(tensor)
                       for tensor in self.module_tensors(tower.blocks[index], f"{tower.prefix}.{index}")})

    def adopt_shard(self, path: Path) -> list[str]:
        """A shard of the output saved by a checkpoint, put back in place; returns the tensors it holds. Moved
        whole when this output is planned the same way (the usual case: the same job on a worker with the same
        settings), else its tensors are written one by one."""
        assert self._writer is not None, "start_output first"
        with WeightFiles(path) as saved:
            names = saved.names()
            if not self._writer.adopt(path):
                for name in names:
                    self.write_tensor(name, saved.get(name))
        self._written.update(names)
        self._output_files = None
        return names

    def finish_output(self) -> None:
        """Every tensor not written yet copied from the input as it is stored, the shards closed, and the input's
        config, tokenizer and processor files copied: a complete model folder, read from here on."""
        assert self._writer is not None and self._output is not None
        for tensor in self.files.names():
            if tensor not in self._written:
                self.write_tensor(tensor, self.files.get(tensor))
        self._writer.close()
        self._writer = None
        copy_folder_files(self.folder, self._output)
        open_to_readers(self._output)

    def close(self) -> None:
        self.files.close()
        if self._output_files is not None:
            self._output_files.close()


def release_freed_memory() -> None:
    """Hands the memory freed with a released block back to the system (glibc keeps freed heap memory for reuse):
    otherwise a streamed job's resident memory would hold several blocks' worth of freed pages."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False  # not glibc: nothing to hand back this way
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


# --- the sequential driver's home of blocks ------------------------------------------------------------------


class DiskHome:
    """Blocks streamed from the input and written to the output (sequential.BlockHome): a block is read onto the
    device for its visit, written to the output in the input's dtype after it is pruned, and released. The zeros of
    every pruned layer are counted before release: the sparsity report needs no second read."""

    def __init__(self, streamed: StreamedModel) -> None:
        self.streamed = streamed
        self.device: torch.device | None = streamed.device
        self.zeros: dict[str, int] = {}

    @contextlib.contextmanager
    def visit(self, block: nn.Module, prefix: str) -> Iterator[None]:
        try:
            with self.streamed.loaded(block, prefix):
                yield
                self._count(block, prefix)
                self.streamed.write_module(block, prefix)
        finally:
            release_freed_memory()

    @contextlib.contextmanager
    def revisit(self, block: nn.Module, prefix: str) -> Iterator[None]:
        """A finished block read back from the output, to carry the calibration data through it."""
        try:
            with self.streamed.loaded(block, prefix):
                yield
        finally:
            release_freed_memory()

    def forward(self) -> contextlib.AbstractContextManager[None]:
        return self.streamed.forward()

    def restore(self, model: nn.Module, resume: Resume) -> None:
        """A resumed job's finished blocks: the output's shards its checkpoint pointed at, put back in place."""
        restored: set[str] = set()
        for path in resume.output_shards:
            restored.update(self.streamed.adopt_shard(path))
            path.unlink(missing_ok=True)
        for prefix, block in self.streamed.blocks:
            if not restored.isdisjoint(self.streamed.module_tensors(block, prefix)):
                with self.streamed.loaded(block, prefix):  # read back from the output: its zeros
                    self._count(block, prefix)

    def _count(self, block: nn.Module, prefix: str) -> None:
        for name, layer in block_linears(block).items():
            self.zeros[f"{prefix}.{name}"] = int((weight_matrix(layer) == 0).sum())

