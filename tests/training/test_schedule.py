"""LR schedules: warmup then decay to min_lr, values at known points."""

from __future__ import annotations

import itertools
import math

import pytest

from lumina_ds.config.run import TrainConfig
from lumina_ds.training.schedule import lr_multiplier, schedule_for, warmup_steps_for


def test_cosine_warmup_then_half_cosine_to_min() -> None:
    kw = {"total_steps": 110, "warmup_steps": 10, "kind": "cosine", "min_ratio": 0.1}
    assert lr_multiplier(0, **kw) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_multiplier(9, **kw) == pytest.approx(1.0)
    assert lr_multiplier(10, **kw) == pytest.approx(1.0)  # decay starts at the peak
    assert lr_multiplier(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi/2) = 0
    assert lr_multiplier(110, **kw) == pytest.approx(0.1)
    assert lr_multiplier(500, **kw) == pytest.approx(0.1)  # never below min_lr past the end


def test_linear_and_none() -> None:
    kw = {"total_steps": 100, "warmup_steps": 0, "min_ratio": 0.0}
    assert lr_multiplier(25, kind="linear", **kw) == pytest.approx(0.75)
    assert lr_multiplier(25, kind="none", **kw) == 1.0


def test_onecycle_starts_low_peaks_then_anneals() -> None:
    kw = {"total_steps": 100, "warmup_steps": 0, "kind": "onecycle", "min_ratio": 0.01}
    values = [lr_multiplier(s, **kw) for s in range(100)]
    peak = max(range(100), key=values.__getitem__)
    assert peak == 29  # 30% of the steps going up
    assert values[0] < 0.05 and values[-1] < 0.05
    assert all(a <= b for a, b in itertools.pairwise(values[: peak + 1]))


def test_warmup_steps_override_ratio() -> None:
    assert warmup_steps_for(TrainConfig(warmup_ratio=0.1), 200) == 20
    assert warmup_steps_for(TrainConfig(warmup_ratio=0.1, warmup_steps=7), 200) == 7


def test_schedule_for_uses_min_lr_ratio() -> None:
    fn = schedule_for(TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_ratio=0.0, lr_scheduler="cosine"), 10)
    assert fn(10) == pytest.approx(0.1)
    assert math.isclose(fn(0), 1.0)
