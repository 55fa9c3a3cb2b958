"""The units an allocation gives one sparsity each: a block of a tower, or a single layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from workers.pruning.models import Tower, block_linears, weight_matrix


@dataclass(frozen=True)
class Group:
    name: str  # "<tower prefix>.<block index>", or a layer's full name
    tower: str
    layers: tuple[str, ...]  # full names of the prunable layers in it
    num_weights: int


def groups(plan: Sequence[tuple[Tower, float]], granularity: str) -> list[Group]:
    """Every group of the planned towers, in forward order; a block without prunable layers makes none."""
    found = []
    for tower, _ in plan:
        for index, block in enumerate(tower.blocks):
            linears = block_linears(block)
            names = {name: f"{tower.prefix}.{index}.{name}" for name in linears}
            sizes = {name: weight_matrix(layer).numel() for name, layer in linears.items()}
            if granularity == "layer":
                found += [Group(names[n], tower.name, (names[n],), sizes[n]) for n in linears]
            elif linears:
                found.append(Group(f"{tower.prefix}.{index}", tower.name, tuple(names.values()),
                                   sum(sizes.values())))
    return found
