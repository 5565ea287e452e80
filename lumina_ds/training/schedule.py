"""Learning-rate schedules: linear warmup then cosine / linear / one-cycle / constant, floored at min_lr."""

from __future__ import annotations

import math
from collections.abc import Callable

from lumina_ds.config.run import TrainConfig


def warmup_steps_for(train: TrainConfig, total_steps: int) -> int:
    if train.warmup_steps is not None:
        return min(train.warmup_steps, total_steps)
    return int(train.warmup_ratio * total_steps)


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if kind == "none":
        return 1.0
    if kind == "onecycle":
        # triangle up over the first 30% (or the warmup, if given), then cosine annealing to min_lr
        warmup_steps = warmup_steps or max(1, int(0.3 * total_steps))
    if step < warmup_steps:
        start = min_ratio if kind == "onecycle" else 0.0
        return start + (1.0 - start) * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    # linear decays straight down; cosine (and onecycle's annealing phase) follow half a cosine
    shape = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def schedule_for(train: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """A function step -> multiplier, for torch's LambdaLR."""
    warmup = warmup_steps_for(train, total_steps)
    min_ratio = train.min_lr / train.learning_rate

    def fn(step: int) -> float:
        return lr_multiplier(
            step, total_steps=total_steps, warmup_steps=warmup, kind=train.lr_scheduler, min_ratio=min_ratio
        )

    return fn
