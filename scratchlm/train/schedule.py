"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

Warmup lets Adam's second-moment estimates settle before steps get large; the cosine decay
anneals toward ``min_lr`` so the model settles into a minimum instead of bouncing around it.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for ``step`` (0-based)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
