"""The block-by-block driver (as in Wanda and SparseGPT), tower by tower: capture a tower's first-block
inputs, then for each block gather statistics with hooks, prune its layers, and re-run the pruned block to
feed the next one.

Only one block's activations are alive at a time: a single [num_samples, tokens, hidden] tensor that each
block's outputs overwrite in place. Where a block lives between visits is a BlockHome's business: in memory (on
the device already), in CPU memory (offloading: each block visits the device in turn and goes back), or in files
on disk (streaming.DiskHome: read for its visit, written to the output after, released).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from workers.pruning.checkpoint import BlockDone, Resume
from workers.pruning.checkpoint import restore as restore_blocks
from workers.pruning.methods import Method
from workers.pruning.models import Tower, block_linears, method_view, weight_matrix
from workers.pruning.spec import JobCancelled


class _StopForward(Exception):
    """Raised from the first block's pre-hook: nothing after it needs to run during capture."""


def _never() -> bool:
    return False


@dataclass(frozen=True)
class ModelInputs:
    """Calibration inputs of a whole model: batch-first tensors plus fixed keyword arguments of its forward."""

    tensors: dict[str, torch.Tensor]  # e.g. input_ids [n, seq], pixel_values [n, 3, h, w]
    options: dict[str, Any] = field(default_factory=dict)  # e.g. use_cache=False

    @property
    def num_samples(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def batches(self, batch_size: int, device: torch.device) -> Iterator[dict[str, Any]]:
        for start in range(0, self.num_samples, batch_size):
            yield {**{name: tensor[start:start + batch_size].to(device) for name, tensor in self.tensors.items()},
                   **self.options}


def as_inputs(windows: torch.Tensor | ModelInputs) -> ModelInputs:
    """Token windows [n, seq_len] are a causal LM's inputs; anything richer comes as ModelInputs already."""
    if isinstance(windows, ModelInputs):
        return windows
    return ModelInputs({"input_ids": windows}, {"use_cache": False})


# What a block receives besides its hidden states, per batch: extra positional and keyword arguments.
BlockArgs = tuple[tuple[Any, ...], dict[str, Any]]


def capture_block_inputs(model: nn.Module, first_block: nn.Module, windows: torch.Tensor | ModelInputs,
                         batch_size: int, device: torch.device | None = None,
                         home: BlockHome | None = None) -> tuple[torch.Tensor | None, list[BlockArgs]]:
    """Hidden states entering the first block for every sample, and the other arguments of each batch.

    The whole model runs forward until it calls first_block, so a tower's inputs are whatever the model
    makes of the calibration data (LLaVA's merged image and text embeddings, BLIP-2's Q-Former outputs...).
    The other arguments (attention mask, position ids, rotary embeddings...) are captured as they come, so
    no model family needs special-casing here. Both end up on `device` (default: the model's device).
    The model runs inside home.forward() (a streamed model reads its modules as they are called), on
    home.device when the home has one.
    """
    inputs = as_inputs(windows)
    home = home or InMemory()
    model_device = home.device or next(model.parameters()).device
    device = device or model_device
    hidden: torch.Tensor | None = None
    batch_args: list[BlockArgs] = []
    offset = 0

    def grab(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        nonlocal hidden
        kwargs = dict(kwargs)
        states = args[0] if args else kwargs.pop("hidden_states")
        if hidden is None:
            hidden = states.new_empty((inputs.num_samples, *states.shape[1:]), device=device)
        hidden[offset:offset + states.shape[0]] = states
        batch_args.append((_to(tuple(args[1:]), device), _to(kwargs, device)))
        raise _StopForward

    # First among the block's pre-hooks: a streamed block is not read only to be stopped.
    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
    try:
        with home.forward():
            for batch in inputs.batches(batch_size, model_device):
                with contextlib.suppress(_StopForward):
                    model(**batch)
                offset += next(iter(batch.values())).shape[0]
    finally:
        handle.remove()
    if not batch_args:
        raise RuntimeError("the model never called its first block")
    return hidden, batch_args


def _to(value: Any, device: torch.device) -> Any:
    """Tensors inside (nested) tuples, lists and dicts moved to device; everything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to(item, device) for item in value)
    if isinstance(value, dict):
        return {key: _to(item, device) for key, item in value.items()}
    return value


def run_block(block: nn.Module, hidden: torch.Tensor, batch_args: list[BlockArgs], batch_size: int,
               write_back: bool) -> None:
    """Runs the block over all inputs; with write_back, its outputs replace the inputs batch by batch."""
    for (args, kwargs), start in zip(batch_args, range(0, hidden.shape[0], batch_size), strict=True):
        out = block(hidden[start:start + batch_size], *args, **kwargs)
        if write_back:
            hidden[start:start + batch_size] = out[0] if isinstance(out, tuple) else out


class BlockHome(Protocol):
    """Where the blocks live between their visits, and how they come to the device for one."""

    device: torch.device | None  # where blocks run; None: where the model is

    def visit(self, block: nn.Module, prefix: str) -> contextlib.AbstractContextManager[None]:
        """The block (module path `prefix`) on the device for its statistics, pruning and propagation; what happens
        after a visit that raised is the home's business too."""
        ...

    def revisit(self, block: nn.Module, prefix: str) -> contextlib.AbstractContextManager[None]:
        """A finished block on the device, only to carry the calibration data through it (a resumed tower)."""
        ...

    def forward(self) -> contextlib.AbstractContextManager[None]:
        """While the whole model runs forward (a tower's first-block inputs are captured)."""
        ...

    def restore(self, model: nn.Module, resume: Resume) -> None:
        """A resumed job's finished blocks put back."""
        ...


@dataclass(frozen=True)
class InMemory:
    """The model in memory: on the device already, or (offloading) on the CPU with each block visiting `device`."""

    device: torch.device | None = None

    def visit(self, block: nn.Module, prefix: str) -> contextlib.AbstractContextManager[None]:
        return _on(block, self.device)

    def revisit(self, block: nn.Module, prefix: str) -> contextlib.AbstractContextManager[None]:
        return _on(block, self.device)

    def forward(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def restore(self, model: nn.Module, resume: Resume) -> None:
        restore_blocks(model, resume)


@contextlib.contextmanager
def _on(block: nn.Module, device: torch.device | None) -> Iterator[None]:
    """The block on `device` for the duration, then back where it was (a no-op without offloading)."""
    home = next(block.parameters()).device
    if device is None or device == home:
        yield
        return
    # Moved outside inference mode: parameters created inside it could never take part in autograd again.
    with torch.inference_mode(False), torch.no_grad():
        block.to(device)
    try:
        yield
    finally:
        with torch.inference_mode(False), torch.no_grad():
            block.to(home)


@dataclass(frozen=True)
class Pruning:
    """What happens to every layer: the method prunes it to its sparsity in the pattern."""

    method: Method
    sparsity: float
    pattern: str = "unstructured"
    # (block index, layer name) -> that layer's own sparsity (a non-uniform allocation); None: `sparsity`
    layer_sparsity: Callable[[int, str], float] | None = None
    # (block index, layer name) -> the dtype the layer is saved in, when narrower than the one it computes in (a
    # bf16 model pruned in fp32 on a CPU): its pruned weights are rounded to it before the block feeds the next,
    # so that later blocks are calibrated on the model as saved (and a streamed run, which reads an earlier tower
    # back from its output, computes the same).
    storage_dtype: Callable[[int, str], torch.dtype | None] | None = None

    def ratio(self, index: int, name: str) -> float:
        return self.sparsity if self.layer_sparsity is None else self.layer_sparsity(index, name)

    def stored(self, index: int, name: str) -> torch.dtype | None:
        return None if self.storage_dtype is None else self.storage_dtype(index, name)


@dataclass(frozen=True)
class Feed:
    """The calibration data driven through the blocks, and where the blocks run."""

    windows: torch.Tensor | ModelInputs | None  # None for methods without statistics
    batch_size: int = 1
    # Offloading: the model stays where it is and each block visits this device for its work.
    device: torch.device | None = None
    # Where the blocks live (streaming.DiskHome: in files); None: InMemory(device).
    home: BlockHome | None = None

    def block_home(self) -> BlockHome:
        return self.home if self.home is not None else InMemory(self.device)


@dataclass(frozen=True)
class Callbacks:
    on_block: Callable[[int, int], None] | None = None  # (blocks done, blocks in all)
    should_cancel: Callable[[], bool] = _never
    # (index, unused so far) after every block: what a checkpoint needs
    after_block: Callable[[int, list[str]], None] | None = None


@dataclass(frozen=True)
class StartAt:
    """Where a resumed tower carries on: the blocks before `block` are pruned already."""

    block: int = 0
    unused: tuple[str, ...] = ()  # what the finished blocks left dense, as "<block index>.<name>"


def prune_sequential(model: nn.Module, blocks: nn.ModuleList, pruning: Pruning, feed: Feed,
                     callbacks: Callbacks = Callbacks(), start: StartAt = StartAt(), prefix: str = "") -> list[str]:
    """Prunes every layer of every block in place, block by block.

    With feed.device (offloading), each block visits the device for its statistics, pruning and propagation;
    with feed.home, the home brings it (prefix: the blocks' module path, "model.layers").
    Returns the layers (as "<block index>.<name>") left dense because calibration never reached them,
    e.g. BLIP-2 Q-Former text-only sublayers, which image queries alone never run.
    """
    unused = list(start.unused)
    home = feed.block_home()
    with torch.inference_mode():
        hidden, batch_args = _block_inputs(model, blocks, pruning.method, feed, start, prefix)
        for index in range(start.block, len(blocks)):
            if callbacks.should_cancel():
                raise JobCancelled(f"cancelled before block {index}")
            last = index + 1 == len(blocks)
            with home.visit(blocks[index], f"{prefix}.{index}" if prefix else str(index)):
                unused += _prune_block(blocks[index], index, pruning, hidden, batch_args, feed.batch_size)
                if hidden is not None and not last:
                    run_block(blocks[index], hidden, batch_args, feed.batch_size, write_back=True)
            if callbacks.after_block is not None:
                callbacks.after_block(index, unused)
            if callbacks.on_block is not None:
                callbacks.on_block(index + 1, len(blocks))
    return unused


def _block_inputs(model: nn.Module, blocks: nn.ModuleList, method: Method, feed: Feed, start: StartAt,
                  prefix: str) -> tuple[torch.Tensor | None, list[BlockArgs]]:
    """The hidden states entering block start.block and every batch's other arguments; none for a method
    without statistics, which runs no forward pass at all."""
    if method.new_stats is None:
        return None, []
    if feed.windows is None:
        raise ValueError(f"{method.name} needs calibration windows")
    # Everything before the tower's first block is never pruned, or belongs to earlier towers, which a resumed run
    # has restored bit for bit: capturing again gives exactly what the interrupted run used. The hidden states
    # entering block `start` are what that run made by carrying them through the blocks before it once each was
    # pruned; the restored blocks make them again, the same way (a checkpoint saves no hidden states: at 7B they
    # are several GB, and a 70B model would upload them once a block).
    home = feed.block_home()
    hidden, batch_args = capture_block_inputs(model, blocks[0], feed.windows, feed.batch_size, feed.device,
                                              home=home)
    assert hidden is not None
    for index in range(start.block):
        with home.revisit(blocks[index], f"{prefix}.{index}" if prefix else str(index)):
            run_block(blocks[index], hidden, batch_args, feed.batch_size, write_back=True)
    return hidden, batch_args


def _prune_block(block: nn.Module, index: int, pruning: Pruning, hidden: torch.Tensor | None,
                 batch_args: list[BlockArgs], batch_size: int) -> list[str]:
    """Prunes one block's layers from statistics gathered on its inputs; returns those no input reached."""
    linears = block_linears(block)
    stats = {} if hidden is None else gather_stats(block, linears, pruning.method, hidden, batch_args, batch_size)
    unused: list[str] = []
    # ("stats", id of a shared stats object) or ("layer", name) -> the layers pruned together, in block order
    shared: dict[tuple[str, Any], list[str]] = {}
    for name in linears:
        if hidden is not None and name not in stats:
            unused.append(f"{index}.{name}")
        elif pruning.ratio(index, name) > 0.0:
            shared.setdefault(("stats", id(stats[name])) if name in stats else ("layer", name), []).append(name)
    for names in shared.values():
        # copy_ keeps the Parameter an ordinary tensor: one made in inference mode would not be
        weights = [weight_matrix(linears[name]) for name in names]
        ratios = [pruning.ratio(index, name) for name in names]
        if len(names) > 1 and pruning.method.prune_group is not None:
            for weight, pruned in zip(weights, pruning.method.prune_group(weights, stats[names[0]], ratios,
                                                                          pruning.pattern), strict=True):
                weight.copy_(pruned)
        else:
            for name, weight, ratio in zip(names, weights, ratios, strict=True):
                weight.copy_(pruning.method.prune(weight, stats.get(name), ratio, pruning.pattern))
        for name, weight in zip(names, weights, strict=True):
            stored = pruning.stored(index, name)
            if stored is not None and stored != weight.dtype:
                weight.copy_(weight.to(stored))
    return unused


def prune_towers(model: nn.Module, plan: Sequence[tuple[Tower, float]], method: Method, pattern: str,
                 inputs: torch.Tensor | ModelInputs | None, batch_size: int = 1,
                 on_block: Callable[[int, int], None] | None = None,
                 should_cancel: Callable[[], bool] = _never,
                 device: torch.device | None = None, resume: Resume | None = None,
                 after_block: Callable[[BlockDone], None] | None = None,
                 layer_sparsity: Mapping[str, float] | None = None, home: BlockHome | None = None,
                 storage_dtypes: Mapping[str, torch.dtype] | None = None) -> list[str]:
    """Prunes each (tower, sparsity) in order, each tower calibrated on the outputs of the towers pruned
    before it. on_block counts blocks over all towers together. Returns the full names of unused layers.

    With `resume`, its first `done` blocks are restored rather than pruned (all of them before any capture:
    a later tower's inputs come through the earlier ones); after_block receives what a checkpoint needs.
    layer_sparsity maps full layer names to their own sparsity (an allocation); others get their tower's.
    home: where the blocks live (default: in memory, visiting `device` when given); storage_dtypes: full layer
    name -> the dtype it is saved in, where that is narrower than the one it computes in (Pruning.storage_dtype)."""
    total = sum(len(tower.blocks) for tower, _ in plan)
    done = resume.done if resume is not None else 0
    unused: list[str] = list(resume.unused) if resume is not None else []
    home = home if home is not None else InMemory(device)
    if resume is not None:
        home.restore(model, resume)

    def block_done(_index: int, _of: int) -> None:
        nonlocal done
        done += 1
        if on_block is not None:
            on_block(done, total)

    first = 0  # the plan-wide number of the tower's first block
    for tower, sparsity in plan:
        start = min(max(done - first, 0), len(tower.blocks))
        prefix = f"{tower.prefix}."
        # What earlier towers left dense, by full name; this tower's own so far (when resuming it), by block.
        before = [name for name in unused if not name.startswith(prefix)]
        mine = [name.removeprefix(prefix) for name in unused if name.startswith(prefix)]

        def report(index: int, skipped: list[str], tower: Tower = tower, first: int = first,
                   before: list[str] = before) -> None:
            if after_block is not None:
                names = before + [f"{tower.prefix}.{name}" for name in skipped]
                after_block(BlockDone(tower, index, first + index + 1, total, names))

        def ratio_of(index: int, name: str, prefix: str = prefix, sparsity: float = sparsity) -> float:
            return sparsity if layer_sparsity is None else layer_sparsity.get(f"{prefix}{index}.{name}", sparsity)

        def stored_as(index: int, name: str, prefix: str = prefix) -> torch.dtype | None:
            return None if storage_dtypes is None else storage_dtypes.get(f"{prefix}{index}.{name}")

        if start < len(tower.blocks):  # a tower finished before the interruption is only restored
            mine = prune_sequential(model, tower.blocks, Pruning(method, sparsity, pattern, ratio_of, stored_as),
                                    Feed(inputs, batch_size, device, home),
                                    Callbacks(block_done, should_cancel, report),
                                    StartAt(start, tuple(mine)), prefix=tower.prefix)
        unused = before + [f"{prefix}{name}" for name in mine]
        first += len(tower.blocks)
    return unused


def gather_stats(block: nn.Module, linears: dict[str, nn.Module], method: Method, hidden: torch.Tensor,
                  batch_args: list[BlockArgs], batch_size: int) -> dict[str, Any]:
    """Statistics of every layer the calibration data reaches; a layer never called gets no entry.

    Layers that read the very same input tensor in every batch (q, k, v; gate, up) share one statistics object:
    theirs would be identical, so it is gathered once (SparseGPT's Hessian costs in_features^2 per token), and
    a method with prune_group can prune them together. Should a block ever feed such layers different inputs
    in a later batch, everything is gathered again, one object per layer.
    """
    try:
        return _gather(block, linears, method, hidden, batch_args, batch_size, share=True)
    except _NotShared:
        return _gather(block, linears, method, hidden, batch_args, batch_size, share=False)


class _NotShared(Exception):
    """Layers that shared an input in an earlier batch did not in this one."""


class _StatsComplete(Exception):  # noqa: N818 (a signal, not an error)
    """Every layer of the block has had its input in this batch: the rest of the pass is not needed."""


def _gather(block: nn.Module, linears: dict[str, nn.Module], method: Method, hidden: torch.Tensor,
            batch_args: list[BlockArgs], batch_size: int, share: bool) -> dict[str, Any]:
    assert method.new_stats is not None
    stats: dict[str, Any] = {}
    leader: dict[str, str] = {}  # a layer that shares another's statistics -> that layer
    # This batch's inputs, in call order per layer. Holding the tensors keeps their id()s unique meanwhile.
    calls: dict[str, list[torch.Tensor]] = {}
    owner: dict[int, str] = {}  # id(input tensor) -> the first layer with its own statistics that read it
    batch_number = 0
    # The layer the first batch called last, when it called every layer once (a dense block): in later batches,
    # once it has its input and every other layer has been called once, nothing the statistics need is left,
    # and the rest of the forward (that layer's product, the residual) is skipped. The outputs of this pass are
    # never used. A block whose calls depend on the data (a mixture of experts) may reach a layer twice or not
    # at all, and always runs whole.
    last: str | None = None
    called_last: str | None = None  # in the first batch

    def hook(name: str, layer: nn.Module) -> Callable[..., None]:
        def add(_module: nn.Module, args: tuple[Any, ...]) -> None:
            nonlocal called_last
            x = args[0]
            calls.setdefault(name, []).append(x)
            if batch_number == 0:
                called_last = name
            _add(name, layer, x)
            if name == last and all(len(calls.get(other, ())) == 1 for other in linears):
                raise _StatsComplete

        return add

    def _add(name: str, layer: nn.Module, x: torch.Tensor) -> None:
        if name not in stats:
            # Only in the first batch: a layer first called later has missed what the other has added.
            first = owner.get(id(x)) if share and batch_number == 0 else None
            if first is not None:  # reads what an earlier layer read in this batch: the same statistics
                leader[name] = first
                stats[name] = stats[first]
                return
            stats[name] = method.new_stats(method_view(layer))  # type: ignore[misc]
        if name in leader:
            return  # its leader has added this input (checked after the batch)
        owner.setdefault(id(x), name)
        stats[name].add(x)

    # Pre-hooks: a layer's input is all its statistics need, and the last one can stop the pass before it runs.
    handles = [layer.register_forward_pre_hook(hook(name, layer)) for name, layer in linears.items()]
    try:
        for number, start in enumerate(range(0, hidden.shape[0], batch_size)):
            batch_number = number
            calls.clear()
            owner.clear()
            with contextlib.suppress(_StatsComplete):
                run_block(block, hidden[start:start + batch_size], batch_args[number:number + 1], batch_size,
                          write_back=False)
            if number == 0 and all(len(calls.get(name, ())) == 1 for name in linears):
                last = called_last
            for name, first in leader.items():
                mine, theirs = calls.get(name, []), calls.get(first, [])
                if len(mine) != len(theirs) or any(a is not b for a, b in zip(mine, theirs, strict=True)):
                    raise _NotShared(name)
    finally:
        calls.clear()
        for handle in handles:
            handle.remove()
    return stats
