"""Globally informed sparsity: how sparse each block (or layer) should be, before layer-wise pruning.

`budget` holds the pure arithmetic (water-filling, OWL's spread); `scoring` the importance estimates that
feed it; `plan` ties them to a model's towers.
"""
