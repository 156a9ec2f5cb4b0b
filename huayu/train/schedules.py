"""Learning-rate schedules as multipliers of the peak learning rate."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "noam", "constant")


def lr_multiplier(name: str, step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Multiplier for optimiser step `step` (0-based, as LambdaLR counts).

    cosine/linear: linear warm-up to 1, then decay to `min_ratio` at `total`.
    noam: the GPT-3 seed's schedule min(s^-0.5, s * w^-1.5) with s = step + 1, scaled by sqrt(w)
    so that its peak (at s = w) is the configured learning rate instead of lr / sqrt(w).
    """
    if name == "noam":
        s, w = step + 1, max(warmup, 1)
        return min(s ** -0.5, s * w ** -1.5) * math.sqrt(w)
    if warmup and step < warmup:
        return (step + 1) / warmup
    if name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if name == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if name == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    raise ValueError(f"unknown schedule '{name}' (choose from {', '.join(SCHEDULES)})")
