"""The block-by-block driver (as in Wanda and SparseGPT): capture block 0's inputs, then for each block
gather statistics with hooks, prune its Linears, and re-run the pruned block to feed the next one.

Only one block's activations are alive at a time: a single [num_samples, seq_len, hidden] tensor that
each block's outputs overwrite in place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from workers.pruning.methods import Method
from workers.pruning.models import block_linears
from workers.pruning.spec import JobCancelled


class _StopForward(Exception):
    """Raised from block 0's pre-hook: nothing after the first block needs to run during capture."""


def _never() -> bool:
    return False


# What a block receives besides its hidden states, per batch: extra positional and keyword arguments.
BlockArgs = tuple[tuple[Any, ...], dict[str, Any]]


def capture_block_inputs(model: nn.Module, first_block: nn.Module, windows: torch.Tensor,
                         batch_size: int) -> tuple[torch.Tensor, list[BlockArgs]]:
    """Hidden states entering the first block for every window, and the other arguments of each batch.

    The other arguments (attention mask, position ids, rotary embeddings...) are whatever the model
    passes, captured as they come, so no model family needs special-casing here.
    """
    device = next(model.parameters()).device
    hidden: torch.Tensor | None = None
    batch_args: list[BlockArgs] = []
    offset = 0

    def grab(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        nonlocal hidden
        kwargs = dict(kwargs)
        states = args[0] if args else kwargs.pop("hidden_states")
        if hidden is None:
            hidden = states.new_empty((windows.shape[0], *states.shape[1:]))
        hidden[offset:offset + states.shape[0]] = states
        batch_args.append((tuple(args[1:]), kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in windows.split(batch_size):
            with contextlib.suppress(_StopForward):
                model(batch.to(device), use_cache=False)
            offset += batch.shape[0]
    finally:
        handle.remove()
    if hidden is None:
        raise RuntimeError("the model never called its first block")
    return hidden, batch_args


def _run_block(block: nn.Module, hidden: torch.Tensor, batch_args: list[BlockArgs], batch_size: int,
               write_back: bool) -> None:
    """Runs the block over all inputs; with write_back, its outputs replace the inputs batch by batch."""
    for (args, kwargs), start in zip(batch_args, range(0, hidden.shape[0], batch_size), strict=True):
        out = block(hidden[start:start + batch_size], *args, **kwargs)
        if write_back:
            hidden[start:start + batch_size] = out[0] if isinstance(out, tuple) else out


def prune_sequential(model: nn.Module, blocks: nn.ModuleList, method: Method, sparsity: float, pattern: str,
                     windows: torch.Tensor | None, batch_size: int = 1,
                     on_block: Callable[[int, int], None] | None = None,
                     should_cancel: Callable[[], bool] = _never) -> None:
    """Prunes every Linear of every block in place. windows may be None for methods without statistics."""
    with torch.inference_mode():
        hidden: torch.Tensor | None = None
        batch_args: list[BlockArgs] = []
        if method.new_stats is not None:
            if windows is None:
                raise ValueError(f"{method.name} needs calibration windows")
            hidden, batch_args = capture_block_inputs(model, blocks[0], windows, batch_size)
        for index, block in enumerate(blocks):
            if should_cancel():
                raise JobCancelled(f"cancelled before block {index}")
            linears = block_linears(block)
            stats = ({} if hidden is None
                     else _gather_stats(block, linears, method, hidden, batch_args, batch_size))
            for name, layer in linears.items():
                pruned = method.prune(layer.weight.data, stats.get(name), sparsity, pattern)
                # copy_ keeps the Parameter an ordinary tensor: assigning one made in inference mode would not
                layer.weight.data.copy_(pruned)
            if hidden is not None and index + 1 < len(blocks):
                _run_block(block, hidden, batch_args, batch_size, write_back=True)
            if on_block is not None:
                on_block(index + 1, len(blocks))


def _gather_stats(block: nn.Module, linears: dict[str, nn.Linear], method: Method, hidden: torch.Tensor,
                  batch_args: list[BlockArgs], batch_size: int) -> dict[str, Any]:
    assert method.new_stats is not None
    stats = {name: method.new_stats(layer) for name, layer in linears.items()}
    handles = [layer.register_forward_hook(lambda _m, args, _out, s=stats[name]: s.add(args[0]))
               for name, layer in linears.items()]
    try:
        _run_block(block, hidden, batch_args, batch_size, write_back=False)
    finally:
        for handle in handles:
            handle.remove()
    return stats
