"""Perplexity of a model streamed from disk, block by block over all evaluation windows: each block is read once.

It gives evaluate.perplexity's number, to the last bit: the windows go in the same batches, and every block sees
exactly what it sees in a full forward pass, because the pass *is* the model's own forward pass. For block i, each
batch runs through the model with the blocks before it replaced by stubs (the one just before i returns the stored
outputs of block i - 1 for this batch, the others pass their input on) and stops once block i has run; its outputs
replace the stored ones. Every block receives the arguments the model's own loop gives it (attention masks, rotary
embeddings), whatever they are per layer. Last, each batch runs with every block a stub, the last one returning
the final hidden states: the model's final norm and head make the logits, and the loss is taken as
evaluate.next_token_nll takes it.

What the blocks need besides (embeddings, final norm, head) is read once and kept for the whole measurement.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from workers.pruning.evaluate import evaluation_batches, next_token_nll, perplexity
from workers.pruning.spec import JobCancelled
from workers.pruning.streaming import StreamedModel

Blocks = Sequence[tuple[str, nn.Module]]  # (module path, block) in forward order


class _Stop(Exception):
    """Raised once the block being measured has run: nothing after it is needed yet."""


class _Unsupported(Exception):
    """A block returns more than its hidden states (attention weights, a cache): measured the generic way."""


def _never() -> bool:
    return False


def streamed_perplexity(streamed: StreamedModel, lm: nn.Module, blocks: Blocks, windows: torch.Tensor,
                        batch_size: int = 4, should_cancel: Callable[[], bool] = _never) -> float:
    """evaluate.perplexity of `lm` (streamed's model or a part of it: BLIP-2's language model), whose decoder
    blocks are `blocks`, with each block read once."""
    batches = evaluation_batches(lm, windows, batch_size)
    try:
        with torch.inference_mode(), streamed.forward(skip=[block for _, block in blocks], parts=(lm,)):
            return _block_by_block(streamed, lm, blocks, batches, should_cancel)
    except _Unsupported:
        # Correct but slower: every block is read once per batch.
        with streamed.forward(parts=(lm,)):
            return perplexity(lm, windows, batch_size, should_cancel)


def _block_by_block(streamed: StreamedModel, lm: nn.Module, blocks: Blocks, batches: Sequence[torch.Tensor],
                    should_cancel: Callable[[], bool]) -> float:
    device = streamed.device
    hidden: list[torch.Tensor | None] = [None] * len(batches)  # each batch's outputs of the last block run
    rest: tuple[Any, ...] | None = None  # what a block returns besides its hidden states: None for a tensor
    for index, (prefix, block) in enumerate(blocks):
        with streamed.loaded(block, prefix):
            for number, batch in enumerate(batches):
                if should_cancel():
                    raise JobCancelled("cancelled during evaluation")
                out = _run_until(lm, batch.to(device), block, blocks[:index], hidden[number], rest)
                states, rest = _split(out)
                hidden[number] = states
    total_nll, total_tokens = 0.0, 0
    for number, batch in enumerate(batches):
        if should_cancel():
            raise JobCancelled("cancelled during evaluation")
        ids = batch.to(device)
        with _stubs(blocks, hidden[number], rest):
            logits = lm(ids, use_cache=False).logits
        total_nll += next_token_nll(logits, ids)
        total_tokens += ids.shape[0] * (ids.shape[1] - 1)
        del logits
    return math.exp(total_nll / total_tokens)


def _run_until(lm: nn.Module, ids: torch.Tensor, block: nn.Module, before: Blocks, stored: torch.Tensor | None,
               rest: tuple[Any, ...] | None) -> Any:
    """What `block` returns for this batch when the model runs with the blocks before it stubbed."""
    seen: list[Any] = []

    def stop(_module: nn.Module, _args: Any, out: Any) -> None:
        seen.append(out)
        raise _Stop

    handle = block.register_forward_hook(stop)
    try:
        with _stubs(before, stored, rest), contextlib.suppress(_Stop):
            lm(ids, use_cache=False)
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError("the model never called its block")
    return seen[0]


def _split(out: Any) -> tuple[torch.Tensor, tuple[Any, ...] | None]:
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) and all(x is None for x in out[1:]):
        return out[0], tuple(out[1:])
    raise _Unsupported


@contextlib.contextmanager
def _stubs(blocks: Blocks, stored: torch.Tensor | None, rest: tuple[Any, ...] | None) -> Iterator[None]:
    """The blocks replaced by stubs for the duration: the last returns `stored`, the others their input, each in
    the form the real blocks return (a tensor, or a tuple with `rest` after it)."""
    if not blocks:
        yield
        return
    last = blocks[-1][1]

    def stub(block: nn.Module) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            states = stored if block is last else (args[0] if args else kwargs["hidden_states"])
            return states if rest is None else (states, *rest)
        return forward

    for _, block in blocks:
        vars(block)["forward"] = stub(block)  # an instance attribute: nn.Module.__call__ runs it, not the class's
    try:
        yield
    finally:
        for _, block in blocks:
            del vars(block)["forward"]
