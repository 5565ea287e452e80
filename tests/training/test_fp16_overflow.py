"""fp16's dynamic loss scaler skips steps by design (it starts at 2^16 and overflows several times at the start): such
steps are counted apart as `overflow_steps` and never skip, rewind or stop the run, while a non-finite loss and an
overflow at the scale's minimum still do. Through the trainer and the train module with the fake engine of
tests/training/fakes.py, whose fp16 variant drives DeepSpeed's own DynamicLossScaler (fp16 cannot run on this CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lumina_ds.config.run import GuardConfig
from lumina_ds.distributed.env import DistInfo
from lumina_ds.errors import TrainingError
from lumina_ds.monitor.callbacks import JsonlLogger
from lumina_ds.training.guard import LossScale, dynamic_loss_scale
from lumina_ds.training.trainer import Trainer
from tests.training.fakes import FakeFp16Engine, Recorder, make_trainer, tiny_model


def fp16_trainer(run_dir: Path, *, overflow_at: set[int], guard: GuardConfig, **kwargs: object) -> Trainer:
    scale = kwargs.pop("initial_scale_power", 16)
    engine = FakeFp16Engine(tiny_model(), overflow_at=overflow_at, initial_scale_power=scale)  # type: ignore[arg-type]
    return make_trainer(run_dir, guard=guard, engine=engine, **kwargs)  # type: ignore[arg-type]


def test_five_overflows_at_the_start_of_a_fresh_run_are_counted_not_diverged(
    tmp_path: Path, process_group: DistInfo, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: each overflow was a guard skip; the third rewound, and a fresh run had nothing to rewind to (E301)."""
    trainer = fp16_trainer(tmp_path, overflow_at={1, 2, 3, 4, 5}, guard=GuardConfig(), total_steps=8)
    recorder = Recorder()
    trainer.callbacks += [recorder, JsonlLogger(tmp_path / "metrics.jsonl")]
    summary = trainer.fit()
    state = trainer.state
    assert (state.step, state.overflow_steps, state.skipped_steps, state.rewinds) == (8, 5, 0, 0)
    assert summary["overflow_steps"] == 5 and summary["skipped_steps"] == 0
    out = capsys.readouterr().out
    assert "not applied" not in out and "rewound" not in out
    # the overflow steps log nothing (not applied); from step 6 on the records count them, at the lowered scale
    # (DeepSpeed's hysteresis of 2 keeps 2^16 at the first overflow, then halves it four times)
    assert [(r["step"], r["overflow_steps"], r["loss_scale"]) for r in recorder.logs] == [
        (step, 5, 4096.0) for step in (6, 7, 8)]  # fmt: skip
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["overflow_steps"] for r in written if "loss" in r] == [5, 5, 5]


def test_a_non_finite_loss_under_fp16_still_skips_rewinds_and_stops_with_e301(
    tmp_path: Path, process_group: DistInfo, capsys: pytest.CaptureFixture[str]
) -> None:
    """The NaN's gradients overflow the scaler too (it lowers its scale), but the guard judged the loss: a skip."""
    guard = GuardConfig(max_skips=2, window=10, max_rewinds=1)
    trainer = fp16_trainer(tmp_path, overflow_at={1, 2}, guard=guard, total_steps=20, save_every=4,
                           faults="nan_loss@6+")  # fmt: skip
    with pytest.raises(TrainingError) as err:
        trainer.fit()
    assert err.value.code == "E301" and "2 skipped steps within 10 (steps [6, 7]) after 1 rewind(s)" in str(err.value)
    out = capsys.readouterr().out
    assert "warning: step 6 not applied: loss is nan (1 of 2 skips allowed in 10 steps)" in out
    assert out.count("rewound to step 4") == 1
    assert (trainer.state.overflow_steps, trainer.state.skipped_steps) == (2, 4)


def test_overflows_at_the_minimum_loss_scale_are_divergence(
    tmp_path: Path, process_group: DistInfo, capsys: pytest.CaptureFixture[str]
) -> None:
    """From 2^2 the scale reaches its floor of 1 after three overflows; lowering it cannot help any more, so the next
    overflows are skips (DeepSpeed's own scaler would raise a bare Exception there: the guard decides instead)."""
    trainer = fp16_trainer(tmp_path, overflow_at=set(range(1, 30)), guard=GuardConfig(), total_steps=20,
                           initial_scale_power=2)  # fmt: skip
    with pytest.raises(TrainingError) as err:
        trainer.fit()
    assert err.value.code == "E301" and "no verified checkpoint to rewind to" in str(err.value)
    assert "3 skipped steps within 50 (steps [4, 5, 6])" in str(err.value)
    out = capsys.readouterr().out
    assert "warning: step 4 not applied: gradients overflow at the minimum fp16 loss scale (1)" in out
    assert trainer.state.overflow_steps == 3


def test_the_loss_scale_is_read_from_each_of_deepspeeds_fp16_optimizers() -> None:
    """ZeRO 1-3 keep a DynamicLossScaler (a static LossScaler at fp32/bf16), ZeRO-0's fp16 optimizers a
    LossScaleConfig: DeepSpeed's own classes, built as its optimizers build them."""
    from types import SimpleNamespace

    from deepspeed.runtime.fp16 import loss_scaler as ds

    args = {ds.INITIAL_LOSS_SCALE: 2.0**16, ds.SCALE_WINDOW: 1000, ds.DELAYED_SHIFT: 2,
            ds.CONSECUTIVE_HYSTERESIS: False, ds.MIN_LOSS_SCALE: 1}  # fmt: skip
    zero = SimpleNamespace(loss_scaler=ds.CreateLossScaler(torch.half, 0, True, args))
    assert dynamic_loss_scale(zero) == LossScale(65536.0, 1.0)
    assert dynamic_loss_scale(SimpleNamespace(loss_scaler=ds.CreateLossScaler(torch.float32, 1.0, False, None))) is None
    zero0 = SimpleNamespace(loss_scale_config=ds.LossScaleConfig(torch.half, True, 0, args))
    assert dynamic_loss_scale(zero0) == LossScale(65536.0, 1.0)
    bf16 = SimpleNamespace(loss_scale_config=ds.LossScaleConfig(torch.bfloat16, True, 0, args))
    assert dynamic_loss_scale(bf16) is None
    assert dynamic_loss_scale(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)) is None
