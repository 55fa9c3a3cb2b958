"""Quality and sparsity measurements of a model: perplexity over token windows, zeros per pruned layer."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.pruning.spec import JobCancelled

# Logits are [batch, seq_len, vocab] in fp32: the batch is capped so they stay near 128 MB (SmolLM2 at 512
# tokens: 1 window), and the loss is taken a few positions at a time, so neither a contiguous copy of the
# shifted logits nor a full log-softmax of them is ever made: evaluation no longer sets a job's peak memory.
_LOGITS_BUDGET = 32 * 2**20
_LOSS_CHUNK_ELEMENTS = 4 * 2**20
_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


def _never() -> bool:
    return False


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
               should_cancel: Callable[[], bool] = _never) -> float:
    """exp(mean next-token NLL over all windows); each window is scored on its own, from its first token.
    (streaming_eval.streamed_perplexity gives the same number for a model streamed from disk.)"""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for batch in evaluation_batches(model, windows, batch_size):
            if should_cancel():
                raise JobCancelled("cancelled during evaluation")
            ids = batch.to(device)
            logits = model(ids, use_cache=False).logits
            total_nll += next_token_nll(logits, ids)
            total_tokens += ids.shape[0] * (ids.shape[1] - 1)
            del logits
    return math.exp(total_nll / total_tokens)


def evaluation_batches(model: nn.Module, windows: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, ...]:
    """The windows in the batches perplexity scores them in: at most batch_size, fewer where the logits would
    exceed their budget (the vocabulary from the head's shape: a streamed model's head on `meta` has it too)."""
    vocab = int(model.get_output_embeddings().weight.shape[0])
    return windows.split(max(1, min(batch_size, _LOGITS_BUDGET // (windows.shape[1] * vocab))))


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Sum over positions t < T-1 of -log p(ids[t+1] | ids[..t]), a slice of positions at a time."""
    seq_len, vocab = logits.shape[1], logits.shape[2]
    step = max(1, _LOSS_CHUNK_ELEMENTS // (logits.shape[0] * vocab))
    total = 0.0
    for start in range(0, seq_len - 1, step):
        stop = min(start + step, seq_len - 1)
        chunk = logits[:, start:stop].float()
        total += float(F.cross_entropy(chunk.reshape(-1, vocab), ids[:, start + 1:stop + 1].reshape(-1),
                                       reduction="sum"))
    return total


def sparsity_report(model: nn.Module, layer_names: Sequence[str],
                    zeros_of: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Zeros in each named Linear's weight and over all of them together.

    Returns {"achieved", "per_layer": {name: sparsity}, "layers": [{name, shape, numel, zeros, sparsity,
    block}], "num_prunable_parameters", "num_zeros"}; block is the first numeric part of the name.
    zeros_of: the zeros of each layer counted already (a streamed model's weights are not in memory).
    """
    modules = dict(model.named_modules())
    layers = []
    for name in layer_names:
        weight = modules[name].weight
        zeros = zeros_of[name] if zeros_of is not None else int((weight == 0).sum())
        match = _BLOCK_INDEX.search(f".{name}.")
        layers.append({"name": name, "shape": list(weight.shape), "numel": weight.numel(), "zeros": zeros,
                       "sparsity": zeros / weight.numel(), "block": int(match[1]) if match else None})
    numel = sum(layer["numel"] for layer in layers)
    zeros = sum(layer["zeros"] for layer in layers)
    return {
        "achieved": zeros / numel if numel else 0.0,
        "per_layer": {layer["name"]: layer["sparsity"] for layer in layers},
        "layers": layers,
        "num_prunable_parameters": numel,
        "num_zeros": zeros,
    }
