"""Per-layer importance scores for the allocation: zeroth-order (forward passes only), first-order, OWL's.

Zeroth-order (ECoFLaP): for every prunable layer l and calibration batch b, perturb the layer's weight by
+-eps*z with z ~ N(0, I) drawn from a generator seeded by (seed, layer, batch), and take the two-point estimate
g = (L_b(W + eps z) - L_b(W - eps z)) / (2 eps); the score is sum_b |g|. Perturbed weights are always written
from a saved copy of the original, never by adding and subtracting, which would drift in bf16/fp16.

The fast path captures the inputs of each block once and, when a layer of block k is perturbed, runs the model
with the blocks before k replaced by a pass-through and block k fed the captured inputs: the same arithmetic
as the naive full forward from block k on, so the scores are identical, bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from workers.pruning import multimodal
from workers.pruning.methods import METHODS, wanda
from workers.pruning.models import Tower, block_linears, weight_matrix
from workers.pruning.sequential import BlockHome, ModelInputs, capture_block_inputs, gather_stats, run_block
from workers.pruning.spec import JobCancelled

# A tower's block k, ready to run for the duration of the context: the model's own in memory, or one read from
# the files of a model streamed from disk (and released after).
BlockReader = Callable[[Tower, int], contextlib.AbstractContextManager[nn.Module]]


def in_memory(tower: Tower, index: int) -> contextlib.AbstractContextManager[nn.Module]:
    return contextlib.nullcontext(tower.blocks[index])

OUTLIER_MULTIPLE = 5.0  # OWL's M: a weight is an outlier when its Wanda score exceeds M times the mean


def _never() -> bool:
    return False


def _ignore(_done: int, _total: int) -> None:
    return None


# --- the loss --------------------------------------------------------------------------------------------


def model_loss(model: multimodal.AnyModel, batch: dict[str, Any]) -> torch.Tensor:
    """The model's own training loss on one calibration batch, in fp32.

    Causal LMs, LLaVA and BLIP-2: next-token cross-entropy over the text (image placeholders and padding are
    not predicted). CLIP: its contrastive loss, which needs at least two image-text pairs per batch.
    """
    adapter = multimodal.adapt(model)
    model = adapter.model
    if adapter.family == multimodal.CLIP:
        return model(**batch, return_loss=True).loss.float()
    logits = model(**batch).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32; fp64 stays
    labels = batch["input_ids"].clone()
    image_token = getattr(model.config, "image_token_id", None)
    if image_token is not None:
        labels[labels == image_token] = -100
    if "attention_mask" in batch:
        labels[batch["attention_mask"] == 0] = -100
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                       ignore_index=-100)


def scoring_batch_size(model: multimodal.AnyModel) -> int:
    # A contrastive loss over one pair is always zero: CLIP scores on batches of pairs.
    return 8 if multimodal.adapt(model).family == multimodal.CLIP else 1


# --- zeroth order ----------------------------------------------------------------------------------------


def direction(weight: torch.Tensor, seed: int, layer: str, batch: int) -> torch.Tensor:
    """z ~ N(0, I) shaped like the weight, the same for a (seed, layer, batch) whatever the order of work."""
    key = hashlib.sha256(f"{seed}:{layer}:{batch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
    return torch.randn(weight.shape, generator=generator, dtype=torch.float32)


class Perturbation:
    """Writes W + sign * eps * z into a layer from a saved copy of W, and W back afterwards."""

    def __init__(self, layer: nn.Module) -> None:
        self.weight = weight_matrix(layer)
        self.saved = self.weight.detach().clone()

    def apply(self, z: torch.Tensor, eps: float, sign: float) -> None:
        # Computed in fp32 at least (fp64 stays fp64), then rounded once to the weight's dtype.
        original = self.saved.to(torch.promote_types(self.saved.dtype, torch.float32))
        self.weight.copy_((original + (sign * eps) * z.to(original.device, original.dtype)).to(self.weight.dtype))

    def restore(self) -> None:
        self.weight.copy_(self.saved)


PERTURBATIONS = ("tensor", "block")


def perturbation_units(block_key: str, full_names: list[str], per_block: bool) -> list[tuple[str, list[str]]]:
    """One block's (score key, full names of the matrices perturbed together): per matrix, or the whole block."""
    if per_block:
        return [(block_key, full_names)] if full_names else []
    return [(full, [full]) for full in full_names]


def two_point(plus: float, minus: float, eps: float) -> float:
    """|(L(W + eps z) - L(W - eps z)) / (2 eps)|: one batch's term of a zeroth-order score."""
    return abs((plus - minus) / (2.0 * eps))


def zeroth_order_scores(model: multimodal.AnyModel, towers: Sequence[Tower], inputs: ModelInputs, eps: float = 1e-3,
                        seed: int = 0, fast: bool = True, batch_size: int | None = None,
                        should_cancel: Callable[[], bool] = _never,
                        on_layer: Callable[[int, int], None] = _ignore,
                        layers: Collection[str] | None = None, perturbation: str = "tensor") -> dict[str, float]:
    """sum_b |(L_b(W + eps z) - L_b(W - eps z)) / (2 eps)| for every prunable layer of the towers, by full name.

    perturbation "block": one direction for all of a block's weight matrices at once (each matrix's part of it
    the very z that "tensor" would perturb it with), one score per block under "<tower prefix>.<index>": two
    forward passes per block and batch instead of two per matrix (7 times fewer on a Llama block). It estimates
    |<grad of the block, z>|, whose expectation grows with the block gradient's norm sqrt(sum_l ||g_l||^2),
    where the sum of the tensor scores grows with sum_l ||g_l||: the two rank blocks alike only roughly.

    `layers` limits the scoring to those full names (a benchmark's sample of the layers; with "block", the
    blocks that hold one of them); None scores all."""
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation must be one of {PERTURBATIONS}; got {perturbation!r}")
    adapter = multimodal.adapt(model)
    model = adapter.model
    batch_size = batch_size or scoring_batch_size(adapter)
    device = next(model.parameters()).device
    batches = list(inputs.batches(batch_size, device))
    per_block = perturbation == "block"
    units_per_block = [[f"{tower.prefix}.{i}.{name}" for name in block_linears(block)]
                       for tower in towers for i, block in enumerate(tower.blocks)]
    if per_block:
        total = sum(1 for names in units_per_block if names and (layers is None or set(names) & set(layers)))
    else:
        total = len(layers) if layers is not None else sum(len(names) for names in units_per_block)
    scores: dict[str, float] = {}
    with torch.inference_mode():
        for tower in towers:
            hidden, block_args = (capture_block_inputs(model, tower.blocks[0], inputs, batch_size) if fast
                                  else (None, []))
            returns_tuple = fast and hidden is not None and block_returns_tuple(tower.blocks[0], hidden, block_args,
                                                                               batch_size)
            for index, block in enumerate(tower.blocks):
                linears = {f"{tower.prefix}.{index}.{name}": layer for name, layer in block_linears(block).items()}
                units = perturbation_units(f"{tower.prefix}.{index}", list(linears), per_block)
                for key, members in units:
                    if should_cancel():
                        raise JobCancelled("cancelled while scoring")
                    if layers is not None and not any(full in layers for full in members):
                        continue
                    perturbations = [(Perturbation(linears[full]), full) for full in members]
                    total_abs = 0.0
                    for number, batch in enumerate(batches):
                        directions = [direction(p.weight, seed, full, number) for p, full in perturbations]
                        losses = []
                        for sign in (1.0, -1.0):
                            for (p, _), z in zip(perturbations, directions, strict=True):
                                p.apply(z, eps, sign)
                            try:
                                if fast:
                                    assert hidden is not None
                                    rows = hidden[number * batch_size:(number + 1) * batch_size]
                                    with _from_block(tower.blocks, index, rows, returns_tuple):
                                        losses.append(float(model_loss(adapter, batch)))
                                else:
                                    losses.append(float(model_loss(adapter, batch)))
                            finally:
                                for p, _ in perturbations:
                                    p.restore()
                        total_abs += two_point(losses[0], losses[1], eps)
                    scores[key] = total_abs
                    on_layer(len(scores), total)
                if fast and hidden is not None and index + 1 < len(tower.blocks):
                    run_block(block, hidden, block_args, batch_size, write_back=True)
    return scores


@contextlib.contextmanager
def _from_block(blocks: nn.ModuleList, start: int, hidden: torch.Tensor, returns_tuple: bool) -> Iterator[None]:
    """The model's forward, with blocks[:start] passing their input through and blocks[start] fed `hidden`."""

    def inject(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def pass_through(*args: Any, **kwargs: Any) -> Any:
        states = args[0] if args else kwargs["hidden_states"]
        return (states,) if returns_tuple else states

    handle = blocks[start].register_forward_pre_hook(inject, with_kwargs=True)
    skipped = list(blocks[:start])
    for block in skipped:
        block.forward = pass_through  # an instance attribute: nn.Module.__call__ finds it before the class's
    try:
        yield
    finally:
        handle.remove()
        for block in skipped:
            del block.forward


def block_returns_tuple(block: nn.Module, hidden: torch.Tensor, block_args: list[Any], batch_size: int) -> bool:
    """Whether this block class returns a tuple (CLIP, GPT-2, older decoders) or the hidden states alone."""
    args, kwargs = block_args[0]
    return isinstance(block(hidden[:batch_size], *args, **kwargs), tuple)


# --- first order -----------------------------------------------------------------------------------------


def first_order_scores(model: multimodal.AnyModel, towers: Sequence[Tower], inputs: ModelInputs,
                       batch_size: int | None = None,
                       should_cancel: Callable[[], bool] = _never,
                       on_batch: Callable[[int, int], None] = _ignore) -> dict[str, float]:
    """sum_b sum_ij |W_ij * dL_b/dW_ij| for every prunable layer: one backward pass per batch."""
    adapter = multimodal.adapt(model)
    model = adapter.model
    batch_size = batch_size or scoring_batch_size(adapter)
    device = next(model.parameters()).device
    layers = {f"{tower.prefix}.{index}.{name}": layer for tower in towers
              for index, block in enumerate(tower.blocks) for name, layer in block_linears(block).items()}
    scores = dict.fromkeys(layers, 0.0)
    # Gradients only for the prunable weights: nothing else needs its own gradient kept.
    previous = {param: param.requires_grad for param in model.parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in layers.values():
        layer.weight.requires_grad_(True)
    batches = list(inputs.batches(batch_size, device))
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for number, batch in enumerate(batches):
                if should_cancel():
                    raise JobCancelled("cancelled while scoring")
                model_loss(adapter, batch).backward()
                with torch.no_grad():
                    for name, layer in layers.items():
                        grad = layer.weight.grad
                        if grad is not None:
                            scores[name] += float((layer.weight.float() * grad.float()).abs().sum())
                            layer.weight.grad = None
                on_batch(number + 1, len(batches))
    finally:
        for param, flag in previous.items():
            param.requires_grad_(flag)
            param.grad = None
    return scores


# --- OWL -------------------------------------------------------------------------------------------------


def outlier_ratios(model: nn.Module, towers: Sequence[Tower], inputs: ModelInputs, per_layer: bool,
                   multiple: float = OUTLIER_MULTIPLE, batch_size: int = 4,
                   should_cancel: Callable[[], bool] = _never, block: BlockReader = in_memory,
                   home: BlockHome | None = None) -> dict[str, tuple[int, int]]:
    """OWL's layer-wise outlier distribution on the dense model, block by block.

    Returns (outliers, weights) per block (the key "<tower prefix>.<index>") or, per_layer, per layer: the
    number of Wanda scores |W_ij| * ||X_j|| above `multiple` times the mean score of the block (or layer).
    `block` and `home`: a model streamed from disk (each block read once; see _wanda_metrics).
    """
    counts: dict[str, tuple[int, int]] = {}
    for key, metric in _wanda_metrics(model, towers, inputs, per_layer, batch_size, should_cancel, rms=False,
                                      block=block, home=home):
        counts[key] = _count_outliers(metric, multiple)
    return counts


def median_scores(model: nn.Module, towers: Sequence[Tower], inputs: ModelInputs, per_layer: bool,
                  batch_size: int = 4, should_cancel: Callable[[], bool] = _never, block: BlockReader = in_memory,
                  home: BlockHome | None = None) -> dict[str, float]:
    """DLP's unimportance (Chen et al., ICML 2025, arXiv:2505.23807) on the dense model, block by block.

    The median of the Wanda scores |W_ij| * rms(X_j) over every weight of a block (the key "<tower prefix>.
    <index>") or, per_layer, of a layer. rms is ||X_j|| over the square root of the tokens seen, so that layers
    that saw different numbers of tokens compare (the reference divides by the number of samples, the same up
    to one constant for a language model). torch.median: the lower middle value of an even count.
    """
    medians: dict[str, float] = {}
    for key, metric in _wanda_metrics(model, towers, inputs, per_layer, batch_size, should_cancel, rms=True,
                                      block=block, home=home):
        medians[key] = float(torch.median(metric))
    return medians


def _wanda_metrics(model: nn.Module, towers: Sequence[Tower], inputs: ModelInputs, per_layer: bool,
                   batch_size: int, should_cancel: Callable[[], bool], rms: bool, block: BlockReader = in_memory,
                   home: BlockHome | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every block's (or layer's) Wanda scores, flattened, from a pass over the dense model.

    A tower's first-block inputs are captured with the whole model running inside home.forward() (a streamed
    model reads what runs before the tower as it is called); then each block is entered once through `block`
    (read, its statistics gathered, its scores taken, the states advanced, released). The arithmetic is the same
    either way: a streamed model's scores equal the in-memory ones, bit for bit."""
    with torch.inference_mode():
        for tower in towers:
            hidden, block_args = capture_block_inputs(model, tower.blocks[0], inputs, batch_size, home=home)
            assert hidden is not None
            for index in range(len(tower.blocks)):
                if should_cancel():
                    raise JobCancelled("cancelled while scoring")
                found: list[tuple[str, torch.Tensor]] = []
                with block(tower, index) as module:
                    linears = block_linears(module)
                    stats = gather_stats(module, linears, METHODS["wanda"], hidden, block_args, batch_size)
                    metrics = {name: wanda.scores(weight_matrix(layer), _norms(stats[name], rms)).flatten()
                               for name, layer in linears.items() if name in stats}
                    if per_layer:
                        found = [(f"{tower.prefix}.{index}.{name}", metric) for name, metric in metrics.items()]
                    elif metrics:
                        found = [(f"{tower.prefix}.{index}", torch.cat(list(metrics.values())))]
                    if index + 1 < len(tower.blocks):
                        run_block(module, hidden, block_args, batch_size, write_back=True)
                # Yielded after the block is released: the consumer's work never holds a streamed block read.
                yield from found


def _norms(stats: wanda.InputNorms, rms: bool) -> torch.Tensor:
    return stats.norms() / math.sqrt(stats.tokens) if rms else stats.norms()


def _count_outliers(metric: torch.Tensor, multiple: float) -> tuple[int, int]:
    return int((metric > multiple * metric.mean()).sum()), metric.numel()
