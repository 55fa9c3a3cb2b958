"""Globally informed sparsity: how sparse each block (or layer) should be, before layer-wise pruning.

`budget` holds the pure arithmetic (water-filling, OWL's spread); `scoring` the importance estimates that
feed it; `registry` the allocations (ALLOCATIONS, as methods.METHODS); `groups` the blocks or layers that get
one sparsity each; `plan` ties them to a model's towers; `cache` keeps scores between jobs.
"""

from workers.pruning.allocation.registry import ALLOCATIONS, Allocation, get_allocation

__all__ = ["ALLOCATIONS", "Allocation", "get_allocation"]
