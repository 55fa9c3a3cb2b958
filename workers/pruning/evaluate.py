"""Quality and sparsity measurements of a model: perplexity over token windows, zeros per pruned layer."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.pruning.spec import JobCancelled

# Logits are [batch, seq_len, vocab] in fp32: the batch is capped so they stay near 256 MB
# (SmolLM2 at 512 tokens: 2 windows).
_LOGITS_BUDGET = 64 * 2**20
_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


def _never() -> bool:
    return False


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
               should_cancel: Callable[[], bool] = _never) -> float:
    """exp(mean next-token NLL over all windows); each window is scored on its own, from its first token."""
    device = next(model.parameters()).device
    vocab = int(model.get_output_embeddings().weight.shape[0])
    batch_size = max(1, min(batch_size, _LOGITS_BUDGET // (windows.shape[1] * vocab)))
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for batch in windows.split(batch_size):
            if should_cancel():
                raise JobCancelled("cancelled during evaluation")
            ids = batch.to(device)
            logits = model(ids, use_cache=False).logits[:, :-1]
            targets = ids[:, 1:]
            flat = logits.reshape(-1, logits.shape[-1]).float()
            nll = F.cross_entropy(flat, targets.reshape(-1), reduction="sum")
            total_nll += float(nll)
            total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)


def sparsity_report(model: nn.Module, layer_names: Sequence[str]) -> dict[str, Any]:
    """Zeros in each named Linear's weight and over all of them together.

    Returns {"achieved", "per_layer": {name: sparsity}, "layers": [{name, shape, numel, zeros, sparsity,
    block}], "num_prunable_parameters", "num_zeros"}; block is the first numeric part of the name.
    """
    modules = dict(model.named_modules())
    layers = []
    for name in layer_names:
        weight = modules[name].weight
        zeros = int((weight == 0).sum())
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
