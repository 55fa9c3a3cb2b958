"""ECoFLaP's zeroth-order scores block-major: each block is read a bounded number of times per scoring pass.

scoring.zeroth_order_scores (fast path) perturbs one layer (or block) at a time and re-runs the model from its
block on: block j is run once for every perturbation in blocks 0..j, which for a model streamed from disk
would mean reading it that many times. Here the loop is turned inside out. A pass visits the blocks in order,
carrying every live "branch" (one perturbation, one sign: the hidden states of every calibration batch); when
block k is visited:
  1. every branch started in an earlier block advances through the dense block k;
  2. for each unit of block k (a weight matrix; with perturbation "block", all of them) and each sign, a branch
     starts: the unit's weights are set to W + sign * eps * z from a saved copy, block k runs on its dense
     inputs, and the weights are written back from the copy (bit for bit, never by subtracting);
  3. the dense hidden states advance through block k.
After the last block each branch runs the head (final norm, head and loss) batch by batch.

Every branch holds one tensor shaped like the captured hidden states, so the units are split into groups whose
branches fit in `max_live_bytes`; each group is one pass, from the block of its first unit to the last block.
The block reads per pass sum to at most (number of groups) x (number of blocks); plan() says exactly how many.
(The first pass starts at block 0, where the dense states enter, whichever block its first unit is in.)

The arithmetic is the fast path's, operation for operation: the same batches, the same directions (per unit and
batch), the same perturbed weights, each block run on the same inputs with the same arguments, the same loss,
and the two-point terms summed over the batches in the same order. The scores are equal, bit for bit.

The core (zeroth_order_pass) knows no model: it gets a block by its index (from memory, or read from files) and
a head as callables. zeroth_order_scores_blockwise wires it to a loaded model, tower by tower.

Also here, for a model streamed from disk (Stream, which the scoring stage passes to every allocation): ECoFLaP's
first-order scores recomputed block by block in reverse (first_order_scores_blockwise: each block read twice,
never a whole-model graph), and alphapruning's exponents with each block read once (layer_alphas_blockwise).
OWL's and DLP's Wanda statistics take a block source in scoring itself (one pass, each block read once).
STREAMED_FAMILIES says which allocation streams for which model family.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from workers.pruning import multimodal
from workers.pruning.allocation import spectral
from workers.pruning.allocation.scoring import (
    PERTURBATIONS,
    BlockReader,
    Perturbation,
    block_returns_tuple,
    direction,
    in_memory,
    model_loss,
    perturbation_units,
    scoring_batch_size,
    two_point,
)
from workers.pruning.models import Tower, block_linears, weight_matrix
from workers.pruning.sequential import BlockArgs, BlockHome, ModelInputs, capture_block_inputs, run_block
from workers.pruning.spec import JobCancelled

# A block by its index in the tower, ready to run for the duration of the context (read, then released).
BlockSource = Callable[[int], AbstractContextManager[nn.Module]]
# (the tower's final hidden states for one batch, that batch's number) -> the loss, as model_loss gives it.
HeadLoss = Callable[[torch.Tensor, int], torch.Tensor]


def _never() -> bool:
    return False


def _ignore(_done: int, _total: int) -> None:
    return None


# --- the plan: pure functions of names and sizes ---------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """What one score is about: the weight matrices of one block perturbed together."""

    key: str  # the score's name: the layer's full name, or "<tower prefix>.<index>" with perturbation "block"
    block: int
    members: tuple[str, ...]  # the matrices' names inside the block (block_linears keys)
    full_names: tuple[str, ...]  # the same, by full name: what the directions are seeded with


@dataclass(frozen=True)
class Plan:
    """The units of a tower in forward order, split into groups of consecutive units: one pass each."""

    num_blocks: int
    groups: tuple[tuple[Unit, ...], ...]

    @property
    def units(self) -> list[Unit]:
        return [unit for group in self.groups for unit in group]

    def first_blocks(self) -> list[int]:
        """Where each pass starts: the first at block 0 (the dense states enter there), every other at its first
        unit's block (where the pass before left the dense states)."""
        return [0 if number == 0 else group[0].block for number, group in enumerate(self.groups)]

    @property
    def block_reads(self) -> int:
        """Blocks read by all passes together, each from its first block to the last: at most groups x blocks."""
        return sum(self.num_blocks - first for first in self.first_blocks())


def tower_units(prefix: str, layer_names: Sequence[Sequence[str]], perturbation: str,
                layers: Collection[str] | None = None) -> list[Unit]:
    """The units of a tower whose block i has the prunable matrices layer_names[i] (block_linears keys), in the
    fast path's order; `layers` keeps those that perturb one of these full names (None: all)."""
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation must be one of {PERTURBATIONS}; got {perturbation!r}")
    units = []
    for index, names in enumerate(layer_names):
        local = {f"{prefix}.{index}.{name}": name for name in names}
        for key, members in perturbation_units(f"{prefix}.{index}", list(local), perturbation == "block"):
            if layers is not None and not any(full in layers for full in members):
                continue
            units.append(Unit(key, index, tuple(local[full] for full in members), tuple(members)))
    return units


def plan(units: Sequence[Unit], num_blocks: int, branch_bytes: int, max_live_bytes: int | None) -> Plan:
    """Groups of consecutive units whose two branches each fit in max_live_bytes (at least one unit per group,
    whatever the budget); None: one group, one pass."""
    per_group = len(units) if max_live_bytes is None else max_live_bytes // max(2 * branch_bytes, 1)
    per_group = max(per_group, 1)
    return Plan(num_blocks, tuple(tuple(units[i:i + per_group]) for i in range(0, len(units), per_group)))


# --- the core: one tower, block-major --------------------------------------------------------------------


@dataclass
class _Branch:
    unit: Unit
    states: dict[float, torch.Tensor] = field(default_factory=dict)  # sign -> hidden states of every batch


def zeroth_order_pass(tower_plan: Plan, block: BlockSource, hidden: torch.Tensor, block_args: Sequence[BlockArgs],
                      batch_size: int, head_loss: HeadLoss, eps: float = 1e-3, seed: int = 0,
                      should_cancel: Callable[[], bool] = _never,
                      on_unit: Callable[[Unit], None] | None = None) -> dict[str, float]:
    """The zeroth-order score of every unit of the plan, by its key: sum_b |(L_b(W + eps z) - L_b(W - eps z)) /
    (2 eps)|, with z = scoring.direction(weight, seed, full name, b).

    `hidden` holds the hidden states entering block 0 for every calibration sample (batch b is rows
    [b * batch_size, (b + 1) * batch_size)), `block_args` each batch's other block arguments (as
    sequential.capture_block_inputs gives both); `hidden` is advanced in place (pass a copy to keep it).
    `block(k)` is entered once per block per pass, tower_plan.block_reads times in all."""
    scores: dict[str, float] = {}
    groups = tower_plan.groups
    for number, (group, first) in enumerate(zip(groups, tower_plan.first_blocks(), strict=True)):
        # Dense states are needed as inputs to this group's blocks and, after the pass, to the next group's first.
        dense_until = groups[number + 1][0].block if number + 1 < len(groups) else group[-1].block
        branches = _one_pass(tower_plan.num_blocks, group, first, dense_until, block, hidden, block_args, batch_size,
                             eps, seed, should_cancel)
        for branch in branches:
            scores[branch.unit.key] = _score(branch, head_loss, batch_size, len(block_args), eps, should_cancel)
            branch.states.clear()
            if on_unit is not None:
                on_unit(branch.unit)
    return scores


def _one_pass(num_blocks: int, group: Sequence[Unit], first: int, dense_until: int, block: BlockSource,
              hidden: torch.Tensor, block_args: Sequence[BlockArgs], batch_size: int, eps: float, seed: int,
              should_cancel: Callable[[], bool]) -> list[_Branch]:
    """Blocks `first` (where `hidden` enters) to the last: the group's branches started and carried to the end;
    the dense states advanced through the blocks before dense_until."""
    branches: list[_Branch] = []
    for index in range(first, num_blocks):
        if should_cancel():
            raise JobCancelled("cancelled while scoring")
        with block(index) as module:
            for branch in branches:
                for states in branch.states.values():
                    run_block(module, states, list(block_args), batch_size, write_back=True)
            starting = [unit for unit in group if unit.block == index]
            if starting:
                linears = block_linears(module)
                for unit in starting:
                    if should_cancel():
                        raise JobCancelled("cancelled while scoring")
                    branches.append(_start(unit, module, linears, hidden, block_args, batch_size, eps, seed))
            if index < dense_until:
                run_block(module, hidden, list(block_args), batch_size, write_back=True)
    return branches


def _start(unit: Unit, module: nn.Module, linears: dict[str, nn.Module], hidden: torch.Tensor,
           block_args: Sequence[BlockArgs], batch_size: int, eps: float, seed: int) -> _Branch:
    """The unit's two branches out of its (loaded) block: each batch's dense inputs run through the block with
    the unit's weights at W + eps z and at W - eps z, z drawn for this unit and batch."""
    outputs = {sign: torch.empty_like(hidden) for sign in (1.0, -1.0)}
    perturbations = [Perturbation(linears[name]) for name in unit.members]
    for number, ((args, kwargs), start) in enumerate(zip(block_args, range(0, hidden.shape[0], batch_size),
                                                         strict=True)):
        rows = hidden[start:start + batch_size]
        directions = [direction(p.weight, seed, full, number) for p, full in zip(perturbations, unit.full_names,
                                                                                   strict=True)]
        for sign, states in outputs.items():
            for p, z in zip(perturbations, directions, strict=True):
                p.apply(z, eps, sign)
            try:
                out = module(rows, *args, **kwargs)
            finally:
                for p in perturbations:
                    p.restore()
            states[start:start + batch_size] = out[0] if isinstance(out, tuple) else out
    return _Branch(unit, outputs)


def _score(branch: _Branch, head_loss: HeadLoss, batch_size: int, batches: int, eps: float,
           should_cancel: Callable[[], bool]) -> float:
    """The fast path's sum, term by term in batch order, from the branches' final hidden states."""
    if should_cancel():
        raise JobCancelled("cancelled while scoring")
    plus, minus = branch.states[1.0], branch.states[-1.0]
    total = 0.0
    for number in range(batches):
        rows = slice(number * batch_size, (number + 1) * batch_size)
        total += two_point(float(head_loss(plus[rows], number)), float(head_loss(minus[rows], number)), eps)
    return total


# --- wiring to a model: the head, and every tower in turn ------------------------------------------------


@contextlib.contextmanager
def tail_stubs(blocks: Sequence[nn.Module], final: torch.Tensor, returns_tuple: bool) -> Iterator[None]:
    """A tower's blocks replaced for the duration: the last returns `final`, the others their input, each in the
    form the real blocks return. The model's forward then computes from `final` what it computes after the tower
    (final norm, head, loss, another tower's contrastive loss), and reads none of the tower's blocks."""
    last = blocks[-1]

    def stub(block: nn.Module) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            states = final if block is last else (args[0] if args else kwargs["hidden_states"])
            return (states,) if returns_tuple else states
        return forward

    for block in blocks:
        vars(block)["forward"] = stub(block)  # an instance attribute: nn.Module.__call__ runs it, not the class's
    try:
        yield
    finally:
        for block in blocks:
            del vars(block)["forward"]


@dataclass(frozen=True)
class FixedTower:
    """A tower that the scored one does not feed (CLIP's other encoder), stubbed with its dense final states."""

    tower: Tower
    final: torch.Tensor  # every sample's final hidden states
    returns_tuple: bool


def model_head_loss(model: multimodal.AnyModel, tower: Tower, batches: Sequence[dict[str, Any]], batch_size: int,
                    returns_tuple: Callable[[], bool], fixed: Sequence[FixedTower] = ()) -> HeadLoss:
    """The model's own loss (scoring.model_loss) on calibration batch b, with `tower`'s final states given: the
    model runs with the tower's blocks stubbed (tail_stubs), and those of the `fixed` towers too.

    returns_tuple: whether the tower's blocks return tuples, asked at the first call (once a block has run).
    Exact only where nothing after the tower reads its inner states (LLaVA's vision_feature_layer -2 does):
    check_head tells."""
    adapter = multimodal.adapt(model)

    def loss(final: torch.Tensor, number: int) -> torch.Tensor:
        rows = slice(number * batch_size, (number + 1) * batch_size)
        with contextlib.ExitStack() as stack:
            stack.enter_context(tail_stubs(tower.blocks, final, returns_tuple()))
            for other in fixed:
                stack.enter_context(tail_stubs(other.tower.blocks, other.final[rows], other.returns_tuple))
            return model_loss(adapter, batches[number])

    return loss


def check_head(model: multimodal.AnyModel, tower: Tower, batch: dict[str, Any],
               head_for: Callable[[bool], HeadLoss]) -> bool:
    """Whether the tower's blocks return tuples, seen in one full forward of batch 0 (in memory), after checking
    that the head (head_for(that form)) on the tower's real final states gives that forward's loss, bit for bit;
    a ValueError if not: something after the tower reads more of it than its final states."""
    seen: list[Any] = []

    def keep(_module: nn.Module, _args: Any, out: Any) -> None:
        seen.append(out)

    handle = tower.blocks[-1].register_forward_hook(keep)
    try:
        full = float(model_loss(multimodal.adapt(model), batch))
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"the model's forward never ran its {tower.name} tower")
    returns_tuple = isinstance(seen[0], tuple)
    final = seen[0][0] if returns_tuple else seen[0]
    if float(head_for(returns_tuple)(final, 0)) != full:
        raise ValueError(f"the model reads more of its {tower.name} tower than the final hidden states (an inner "
                         "layer's output?): its zeroth-order scores cannot be computed block-major")
    return returns_tuple


def dense_final(block: BlockSource, num_blocks: int, hidden: torch.Tensor, block_args: Sequence[BlockArgs],
                batch_size: int) -> torch.Tensor:
    """A tower's final hidden states for every sample: one pass, each block read once; `hidden` is advanced."""
    for index in range(num_blocks):
        with block(index) as module:
            run_block(module, hidden, list(block_args), batch_size, write_back=True)
    return hidden


@dataclass(frozen=True)
class BlockwiseScores:
    scores: dict[str, float]
    plans: dict[str, Plan]  # per tower prefix: its groups, and block_reads, the blocks its scoring reads
    fixed_reads: int  # blocks read to give the fixed towers their dense final states (0 without fix_other_towers)

    @property
    def block_reads(self) -> int:
        return sum(p.block_reads for p in self.plans.values()) + self.fixed_reads


def zeroth_order_scores_blockwise(model: multimodal.AnyModel, towers: Sequence[Tower], inputs: ModelInputs,
                                  eps: float = 1e-3, seed: int = 0, batch_size: int | None = None,
                                  should_cancel: Callable[[], bool] = _never,
                                  on_layer: Callable[[int, int], None] = _ignore,
                                  layers: Collection[str] | None = None, perturbation: str = "tensor",
                                  max_live_bytes: int | None = None, block: BlockReader = in_memory,
                                  device: torch.device | None = None,
                                  fix_other_towers: bool = False, verify: bool = True,
                                  home: BlockHome | None = None,
                                  running: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
                                  ) -> BlockwiseScores:
    """scoring.zeroth_order_scores(model, towers, inputs, ..., fast=True), the same dict bit for bit, block-major.

    `block(tower, k)`: the tower's block k, ready to run inside the context (default: the model's own, in memory;
    a streamed model reads it there). fix_other_towers (CLIP only, whose encoders do not feed each other): the
    other towers are stubbed with their dense final states in every head forward instead of run, which costs one
    pass over each of them up front. verify: check_head on every tower (one full forward in memory).
    on_layer(done, total) counts the scores as they are computed, at the end of each pass.

    A streamed model: every tower's first-block inputs are captured first, the whole model running inside
    home.forward() (streaming: what runs before the tower is read as it is called); then the passes and the heads
    run inside running() (streaming: the model with every scored block left alone, so that the modules outside
    the blocks are read once and kept while blocks come only through `block`)."""
    adapter = multimodal.adapt(model)
    model = adapter.model
    if fix_other_towers and adapter.family != multimodal.CLIP:
        raise ValueError("only CLIP's towers are independent of each other; fix_other_towers is for CLIP")
    batch_size = batch_size or scoring_batch_size(adapter)
    device = device or next(model.parameters()).device
    batches = list(inputs.batches(batch_size, device))
    units = {tower.prefix: tower_units(tower.prefix, [list(block_linears(b)) for b in tower.blocks], perturbation,
                                       layers) for tower in towers}
    total = sum(len(u) for u in units.values())
    fixing = fix_other_towers and len(towers) > 1
    scores: dict[str, float] = {}
    plans: dict[str, Plan] = {}
    fixed: dict[str, FixedTower] = {}
    fixed_reads = 0
    forms: dict[str, dict[str, bool]] = {tower.prefix: {} for tower in towers}

    done = [0]

    def counted(_unit: Unit) -> None:
        done[0] += 1
        on_layer(done[0], total)

    with torch.inference_mode():
        captured: dict[str, tuple[torch.Tensor, list[BlockArgs]]] = {}
        for tower in towers:
            if units[tower.prefix] or fixing:
                hidden, block_args = capture_block_inputs(model, tower.blocks[0], inputs, batch_size, device,
                                                          home=home)
                assert hidden is not None
                captured[tower.prefix] = hidden, block_args
        if fixing:
            for tower in towers:
                hidden, block_args = captured[tower.prefix]
                form = forms[tower.prefix]
                # A copy advanced: the capture (the same, bit for bit, as a capture made again) feeds the scoring.
                final = dense_final(_noting_source(block, tower, form, hidden, block_args, batch_size),
                                    len(tower.blocks), hidden.clone(), block_args, batch_size)
                fixed[tower.prefix] = FixedTower(tower, final, form["tuple"])
                fixed_reads += len(tower.blocks)
        with running():
            for tower in towers:
                if not units[tower.prefix]:
                    plans[tower.prefix] = plan([], len(tower.blocks), 0, None)
                    continue
                hidden, block_args = captured.pop(tower.prefix)
                tower_plan = plan(units[tower.prefix], len(tower.blocks), hidden.nbytes, max_live_bytes)
                plans[tower.prefix] = tower_plan
                others = [f for prefix, f in fixed.items() if prefix != tower.prefix]
                form = forms[tower.prefix]
                if verify:

                    def head_for(returns_tuple: bool, tower: Tower = tower,
                                 others: list[FixedTower] = others) -> HeadLoss:
                        return model_head_loss(adapter, tower, batches, batch_size, lambda: returns_tuple, others)

                    form["tuple"] = check_head(adapter, tower, batches[0], head_for)
                head = model_head_loss(adapter, tower, batches, batch_size, lambda form=form: form["tuple"], others)
                scores.update(zeroth_order_pass(tower_plan, _noting_source(block, tower, form, hidden, block_args,
                                                                           batch_size),
                                                hidden, block_args, batch_size, head, eps, seed, should_cancel,
                                                counted))
    return BlockwiseScores(scores, plans, fixed_reads)


def _noting_source(block: BlockReader, tower: Tower, form: dict[str, bool], hidden: torch.Tensor,
                   block_args: list[BlockArgs], batch_size: int) -> BlockSource:
    """The tower's blocks from `block`; the first one entered also tells whether the blocks return tuples, run on
    `hidden`, which then holds that block's inputs (the dense states are advanced only after a block's visit)."""

    @contextlib.contextmanager
    def source(index: int) -> Iterator[nn.Module]:
        with block(tower, index) as module:
            if "tuple" not in form:
                form["tuple"] = block_returns_tuple(module, hidden, block_args, batch_size)
            yield module

    return source


# --- first order: block by block in reverse --------------------------------------------------------------


def first_order_scores_blockwise(model: multimodal.AnyModel, towers: Sequence[Tower], inputs: ModelInputs,
                                 batch_size: int | None = None, should_cancel: Callable[[], bool] = _never,
                                 on_block: Callable[[int, int], None] = _ignore, block: BlockReader = in_memory,
                                 device: torch.device | None = None, home: BlockHome | None = None,
                                 running: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
                                 ) -> dict[str, float]:
    """scoring.first_order_scores (sum_b sum_ij |W_ij * dL_b/dW_ij| per prunable layer) without a whole-model graph:
    a causal LM's one tower, block by block.

    1. A dense pass stores every block's inputs (each block entered once, without gradients).
    2. The head (final norm, head, loss: the model with its blocks stubbed, as the zeroth-order head) gives
       dL_b/d(final states) for every batch b.
    3. Backward from the last block to the first (each entered once): its forward recomputed from its stored
       inputs with gradients for its weight matrices, backward with the gradient coming from the block after;
       every layer's |W * dL_b/dW| summed, the gradient of the block's inputs passed on to the block before.
    Each block is entered twice in all. The per-batch terms are summed in the in-memory order (batch by batch),
    but the gradients come from a different graph (one block at a time instead of the whole model): the scores
    equal the in-memory ones within float rounding, not bit for bit.

    Memory: every block's inputs (num_samples x tokens x hidden each), kept on the CPU when the device is another.
    `block`, `home`, `running`: as zeroth_order_scores_blockwise's."""
    adapter = multimodal.adapt(model)
    model = adapter.model
    if adapter.family != multimodal.CAUSAL_LM or len(towers) != 1:
        raise ValueError("first-order scores block by block are computed for a causal language model's one tower")
    tower = towers[0]
    batch_size = batch_size or scoring_batch_size(adapter)
    device = device or next(model.parameters()).device
    batches = list(inputs.batches(batch_size, device))
    count = len(tower.blocks)
    names = [{name: f"{tower.prefix}.{index}.{name}" for name in block_linears(b)} for index, b in
             enumerate(tower.blocks)]
    scores = {full: 0.0 for per_block in names for full in per_block.values()}
    keep = torch.device("cpu")
    # Gradients only for the weights scored (set per block below): the head's own need none.
    previous = {param: param.requires_grad for param in model.parameters()}
    for param in previous:
        param.requires_grad_(False)
    try:
        # Outside inference mode: tensors made inside it could not take part in the backward pass.
        with torch.inference_mode(False):
            with torch.no_grad():
                hidden, block_args = capture_block_inputs(model, tower.blocks[0], inputs, batch_size, device,
                                                          home=home)
                assert hidden is not None
                stored: list[torch.Tensor | None] = []
                form: dict[str, bool] = {}
                for index in range(count):
                    if should_cancel():
                        raise JobCancelled("cancelled while scoring")
                    with _noting_source(block, tower, form, hidden, block_args, batch_size)(index) as module:
                        stored.append(hidden.to(keep, copy=True))
                        run_block(module, hidden, block_args, batch_size, write_back=True)
            head = model_head_loss(adapter, tower, batches, batch_size, lambda: form["tuple"])
            grads = torch.empty_like(hidden)
            with running(), torch.enable_grad():
                for number in range(len(batches)):
                    rows = slice(number * batch_size, (number + 1) * batch_size)
                    final = hidden[rows].detach().requires_grad_(True)
                    head(final, number).backward()
                    assert final.grad is not None
                    grads[rows] = final.grad
            del hidden
            for index in reversed(range(count)):
                if should_cancel():
                    raise JobCancelled("cancelled while scoring")
                inputs_k = stored[index]
                assert inputs_k is not None
                with block(tower, index) as module:
                    _block_backward(module, names[index], inputs_k, grads, block_args, batch_size, scores, device)
                stored[index] = None  # released as soon as used: the stored inputs shrink as the pass goes back
                on_block(count - index, count)
    finally:
        for param, flag in previous.items():
            param.requires_grad_(flag)
            param.grad = None
    return scores


def _block_backward(module: nn.Module, names: dict[str, str], inputs: torch.Tensor, grads: torch.Tensor,
                    block_args: Sequence[BlockArgs], batch_size: int, scores: dict[str, float],
                    device: torch.device) -> None:
    """One block's scores added to `scores` batch by batch, and `grads` (dL/d its outputs) replaced by dL/d its
    inputs."""
    linears = block_linears(module)
    weights: dict[str, torch.Tensor] = {name: layer.weight for name, layer in linears.items()}
    flags = {name: weight.requires_grad for name, weight in weights.items()}
    try:
        for weight in weights.values():
            weight.requires_grad_(True)
        for (args, kwargs), start in zip(block_args, range(0, inputs.shape[0], batch_size), strict=True):
            rows = slice(start, start + batch_size)
            states = inputs[rows].to(device, copy=True).requires_grad_(True)
            with torch.enable_grad():
                out = module(states, *args, **kwargs)
                (out[0] if isinstance(out, tuple) else out).backward(grads[rows])
            with torch.no_grad():
                for name, weight in weights.items():
                    if weight.grad is not None:
                        scores[names[name]] += float((weight.float() * weight.grad.float()).abs().sum())
                        weight.grad = None
            assert states.grad is not None
            grads[rows] = states.grad
    finally:
        for name, weight in weights.items():
            weight.requires_grad_(flags[name])
            weight.grad = None


# --- alphapruning: each block's matrices read once -------------------------------------------------------


def layer_alphas_blockwise(towers: Sequence[Tower], block: BlockReader = in_memory, peak: bool = True,
                           should_cancel: Callable[[], bool] = _never,
                           on_layer: Callable[[int, int], None] = _ignore) -> dict[str, float]:
    """spectral.layer_alphas, the same dict bit for bit, with each block entered once through `block`."""
    total = sum(len(block_linears(b)) for tower in towers for b in tower.blocks)
    alphas: dict[str, float] = {}
    with torch.inference_mode():
        for tower in towers:
            for index in range(len(tower.blocks)):
                with block(tower, index) as module:
                    for name, layer in block_linears(module).items():
                        if should_cancel():
                            raise JobCancelled("cancelled while scoring")
                        alphas[f"{tower.prefix}.{index}.{name}"] = spectral.hill_alpha(
                            spectral.esd(weight_matrix(layer)), peak)
                        on_layer(len(alphas), total)
    return alphas


# --- a model streamed from disk --------------------------------------------------------------------------


class StreamSource(Protocol):
    """A model streamed from disk as scoring reaches it (streaming.StreamedModel is one)."""

    device: torch.device

    def block(self, tower: Tower, index: int) -> AbstractContextManager[nn.Module]: ...

    def forward(self, skip: Collection[nn.Module] = (),
                parts: Sequence[nn.Module] = ()) -> AbstractContextManager[None]: ...


@dataclass(frozen=True)
class _Capturing:
    """sequential.BlockHome for capturing a tower's inputs from a streamed model: the whole model runs streamed."""

    source: StreamSource

    @property
    def device(self) -> torch.device:
        return self.source.device

    def forward(self) -> AbstractContextManager[None]:
        return self.source.forward()

    def visit(self, block: nn.Module, prefix: str) -> AbstractContextManager[None]:
        raise NotImplementedError("scoring visits blocks through Stream.block")

    def revisit(self, block: nn.Module, prefix: str) -> AbstractContextManager[None]:
        raise NotImplementedError("scoring visits blocks through Stream.block")

    def restore(self, model: nn.Module, resume: Any) -> None:
        raise NotImplementedError("scoring resumes nothing")


@dataclass(frozen=True)
class Stream:
    """How scoring reaches a model streamed from disk (`offload: "disk"`): blocks read one at a time.

    max_live_bytes: what the zeroth-order branches may hold at once (None: no limit, one pass per tower)."""

    source: StreamSource
    max_live_bytes: int | None = None

    def block(self, tower: Tower, index: int) -> AbstractContextManager[nn.Module]:
        return self.source.block(tower, index)

    def home(self) -> BlockHome:
        return _Capturing(self.source)

    def running(self, towers: Sequence[Tower]) -> Callable[[], AbstractContextManager[None]]:
        """The model runs with the towers' blocks left to `block` (never read by a forward): its other modules
        are read when first called and kept until the end."""
        return lambda: self.source.forward(skip=[b for tower in towers for b in tower.blocks])


# Model families whose scores each allocation computes from a streamed model (None: every family). LLaVA and
# BLIP-2 feed one tower's inner states (LLaVA's vision_feature_layer) or every block (BLIP-2's Q-Former
# cross-attention) into the next tower: neither a head from final states nor a gradient through final states
# describes them.
STREAMED_FAMILIES: dict[str, frozenset[str] | None] = {
    "owl": None,
    "dlp": None,
    "alphapruning": None,
    "ecoflap-zeroth": frozenset({multimodal.CAUSAL_LM, multimodal.CLIP}),
    "ecoflap-first": frozenset({multimodal.CAUSAL_LM}),
}


def streams(allocation: str, family: str) -> bool:
    """Whether `allocation`'s scores are computed for a model of this family streamed from disk."""
    if allocation not in STREAMED_FAMILIES:
        return False
    families = STREAMED_FAMILIES[allocation]
    return families is None or family in families


def zeroth_order_streamed(stream: Stream, model: multimodal.AnyModel, towers: Sequence[Tower], inputs: ModelInputs,
                          eps: float, seed: int, should_cancel: Callable[[], bool],
                          on_layer: Callable[[int, int], None], perturbation: str) -> dict[str, float]:
    """zeroth_order_scores_blockwise on a streamed model (CLIP: its other tower fixed by its final states)."""
    family = multimodal.adapt(model).family
    return zeroth_order_scores_blockwise(
        model, towers, inputs, eps, seed, should_cancel=should_cancel, on_layer=on_layer, perturbation=perturbation,
        max_live_bytes=stream.max_live_bytes, block=stream.block, device=stream.source.device,
        fix_other_towers=family == multimodal.CLIP, verify=False, home=stream.home(),
        running=stream.running(towers)).scores


def first_order_streamed(stream: Stream, model: multimodal.AnyModel, towers: Sequence[Tower], inputs: ModelInputs,
                         should_cancel: Callable[[], bool], on_block: Callable[[int, int], None]) -> dict[str, float]:
    return first_order_scores_blockwise(model, towers, inputs, should_cancel=should_cancel, on_block=on_block,
                                        block=stream.block, device=stream.source.device, home=stream.home(),
                                        running=stream.running(towers))
