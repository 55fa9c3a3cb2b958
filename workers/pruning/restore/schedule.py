"""The learning-rate schedule of restoration: linear warm-up, then cosine decay towards zero."""

from __future__ import annotations

import math


def warmup_count(warmup_steps: float, steps: int) -> int:
    """Warm-up steps: a value in (0, 1) is a fraction of `steps`, anything else a number of steps; at most `steps`."""
    count = round(warmup_steps * steps) if 0 < warmup_steps < 1 else int(warmup_steps)
    return max(0, min(count, steps))


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """The multiplier of the peak learning rate for the update of `step` (0-based).

    Warm-up reaches the peak at its last step, (step + 1) / warmup, so that the first update already moves
    (a factor of 0 would waste a step); the cosine then starts at 1 and approaches 0 at `steps`, which is
    never reached, so the last update is small but not zero.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
