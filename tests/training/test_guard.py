"""The divergence guard: its tests on numbers, and its veto inside a real DeepSpeed engine at ZeRO 0, 2 and 3."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lumina_ds.batch import Batch
from lumina_ds.config.presets import get_preset
from lumina_ds.config.run import GuardConfig
from lumina_ds.distributed.env import DistInfo
from lumina_ds.errors import ConfigError
from lumina_ds.training.engine import build_engine, build_model
from lumina_ds.training.faults import Fault, FaultPlan, parse_faults
from lumina_ds.training.guard import DivergenceGuard, LossScale
from lumina_ds.training.train_module import TrainModule


def step(guard: DivergenceGuard, n: int, loss: float, norm: float | None = 1.0) -> str | None:
    guard.judge_loss(loss)
    guard.judge_grad_norm(norm)
    skip = guard.record(step=n, data_step=n + 100, applied=True)
    return skip.reason if skip else None


def test_spikes_are_judged_against_the_mean_of_applied_steps_once_the_history_is_long_enough() -> None:
    guard = DivergenceGuard(GuardConfig(window=4, min_history=3, loss_spike=3.0, grad_norm_spike=10.0), vocab_size=4096)
    assert step(guard, 1, 17.0) == "loss 17 is above 2 ln(vocab) = 16.6"  # diverged before any history
    assert [step(guard, n, 2.0) for n in (2, 3)] == [None, None]
    assert step(guard, 4, 7.0) is None  # 3.5x the mean, but only 2 steps of history
    # history now 2, 2, 7: mean 3.67; 11.5 is 3.1x it, and the skipped step joins no history
    assert step(guard, 5, 11.5) == "loss 11.5 is 3.1x the mean of the last 3 steps (3.667)"
    assert list(guard.losses) == [2.0, 2.0, 7.0]
    assert step(guard, 6, 8.0) is None  # 2.2x the mean
    assert step(guard, 7, 2.0, norm=40.0) == "gradient norm 40 is 40.0x the mean of the last 4 steps (1)"
    assert step(guard, 8, 2.0, norm=9.0) is None  # 9x: under the factor of 10
    assert step(guard, 9, float("nan")) == "loss is nan"
    assert step(guard, 10, 2.0, norm=float("inf")) == "gradient norm is inf"


def test_by_default_a_transient_gradient_norm_spike_is_applied_and_clipped_not_skipped() -> None:
    """make demo's own gradient norms: 1.8 falling to 1.0 over 11 steps, then 24.98 at step 12 (18x), from which the
    run recovers. A factor of 10 skipped it and the next two, and stalled the run into E301."""
    guard = DivergenceGuard(GuardConfig(), vocab_size=2048)
    norms = [1.81, 1.66, 1.56, 1.31, 1.29, 1.35, 1.29, 1.17, 1.29, 1.17, 1.02, 24.98, 0.92, 0.8, 0.79, 13.03]
    assert [step(guard, n, 7.0 - n / 10, norm) for n, norm in enumerate(norms, start=1)] == [None] * len(norms)


def test_the_grad_norm_reason_names_the_ratio_and_the_window() -> None:
    guard = DivergenceGuard(GuardConfig(window=8, min_history=2, grad_norm_spike=10.0), vocab_size=64)
    step(guard, 1, 2.0, norm=2.0)
    step(guard, 2, 2.0, norm=4.0)
    assert step(guard, 3, 2.0, norm=40.0) == "gradient norm 40 is 13.3x the mean of the last 2 steps (3)"


def test_skips_count_within_the_window_and_a_rewind_names_their_data_steps() -> None:
    guard = DivergenceGuard(GuardConfig(window=5, max_skips=3), vocab_size=64)
    for n in (1, 4):
        step(guard, n, math.inf)
    assert not guard.rewind_due
    step(guard, 7, math.inf)  # step 1 is not among the last 5 steps (3-7): 2 skips in the window
    assert [s.step for s in guard.skips] == [4, 7] and not guard.rewind_due
    step(guard, 8, math.inf)
    assert guard.rewind_due
    assert guard.rewound() == [104, 107, 108] and not guard.skips and guard.rewinds == 1


def test_deepspeed_skipping_a_step_itself_counts_as_a_skip() -> None:
    guard = DivergenceGuard(GuardConfig(), vocab_size=64)
    guard.judge_loss(2.0)
    skip = guard.record(step=1, data_step=1, applied=False)
    assert skip is not None and skip.reason == "DeepSpeed found non-finite gradients"


def test_a_loss_scaler_overflow_is_no_skip_unless_the_guard_vetoed_it_or_the_scale_is_at_its_minimum() -> None:
    """fp16's scaler skips steps by design while it lowers its scale; at its floor an overflow is divergence."""
    guard = DivergenceGuard(GuardConfig(), vocab_size=64)
    guard.judge_loss(2.0)
    assert guard.record(step=1, data_step=1, applied=False, overflow=LossScale(65536.0, 1.0)) is None
    assert not guard.skips and not guard.losses  # no skip, and no history: the step was not applied
    guard.judge_loss(math.nan)  # the scaler overflows on a NaN's gradients too, but the guard judged the loss
    skip = guard.record(step=2, data_step=2, applied=False, overflow=LossScale(32768.0, 1.0))
    assert skip is not None and skip.reason == "loss is nan"
    guard.judge_loss(2.0)
    skip = guard.record(step=3, data_step=3, applied=False, overflow=LossScale(1.0, 1.0))
    assert skip is not None and skip.reason == "gradients overflow at the minimum fp16 loss scale (1)"
    assert [s.step for s in guard.skips] == [2, 3]


def test_guard_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="spike factors"):
        GuardConfig(loss_spike=0.5).validate()
    GuardConfig(loss_spike=0, grad_norm_spike=0).validate()  # both off is allowed
    off = DivergenceGuard(GuardConfig(loss_spike=0), vocab_size=64)
    assert step(off, 1, 1e6) is None and step(off, 2, math.nan) == "loss is nan"  # no ceiling either


def test_fault_specs_parse_and_one_shot_faults_fire_once() -> None:
    assert parse_faults("nan_loss@5, spike_loss@7+:1,oom@3") == [
        Fault("nan_loss", 5), Fault("spike_loss", 7, repeat=True, rank=1), Fault("oom", 3)]  # fmt: skip
    with pytest.raises(ValueError, match="kind@step"):
        parse_faults("nan@5")
    plan = FaultPlan(parse_faults("nan_loss@2,spike_loss@3+:1"), rank=1)
    one = torch.tensor(2.0)
    assert plan.poison(one, step=1) == 2.0 and math.isnan(plan.poison(one, step=2)) and plan.poison(one, step=2) == 2.0
    assert [float(plan.poison(one, step=s)) for s in (3, 4)] == [2000.0, 2000.0]
    assert FaultPlan(parse_faults("spike_loss@3+:1"), rank=0).poison(one, step=3) == 2.0


# Per ZeRO stage, a real engine in this process steps through a clean step, a NaN-poisoned one (vetoed by the loss
# test), a clean one, and a 1000x loss spike, vetoed by the loss test or, with the loss test off, by the gradient-norm
# test. The weights and Adam's moments before and after every vetoed step are compared.
def snapshot(engine: Any) -> tuple[torch.Tensor, torch.Tensor]:
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    moments = [s["exp_avg"].float().flatten() for s in base.state.values() if "exp_avg" in s]
    # the fp32 tensors the torch optimizer steps: the model's own at ZeRO-0, ZeRO's flat partitions otherwise
    # (ZeRO-3 hands them to the torch optimizer one sub-group at a time, inside its step)
    stepped = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    stepped = stepped or [p for g in base.param_groups for p in g["params"]]
    params = torch.cat([p.detach().float().flatten().clone() for p in stepped])
    return params, torch.cat(moments).clone() if moments else torch.zeros(1)


def random_batches(vocab: int, n: int) -> Iterator[Batch]:
    g = torch.Generator().manual_seed(3)
    for _ in range(n):
        ids = torch.randint(6, vocab, (2, 32), generator=g)
        yield Batch(ids, torch.roll(ids, -1, 1), torch.arange(32).expand(2, 32))


def run_stage(info: DistInfo, stage: int, loss_spike: float) -> dict[str, list[Any]]:
    run = get_preset("debug")
    run.train.precision, run.distributed.zero_stage, run.train.grad_accum = "fp32", stage, 2
    run.train.micro_batch_size, run.train.warmup_ratio, run.train.learning_rate = 2, 0.0, 1e-3
    run.train.guard.min_history, run.train.guard.loss_spike = 1, loss_spike
    torch.manual_seed(0)
    engine = build_engine(build_model(run, world_size=1, precision="fp32"), run, info=info, total_steps=10,
                          precision="fp32").engine  # fmt: skip
    guard = DivergenceGuard(run.train.guard, vocab_size=run.model.vocab_size)
    module = TrainModule(engine, guard=guard, faults=FaultPlan(parse_faults("nan_loss@2,spike_loss@4"), rank=0))
    data = random_batches(run.model.vocab_size, 8)
    out: dict[str, list[Any]] = {"applied": [], "unchanged": [], "moved": [], "reasons": [], "norms": []}
    for n in range(1, 5):
        params, moments = snapshot(engine)
        result = module.train_step(data, step=n, data_step=n)
        assert result is not None
        after_params, after_moments = snapshot(engine)
        out["applied"].append(result.applied)
        out["unchanged"].append(bool(torch.equal(params, after_params) and torch.equal(moments, after_moments)))
        out["moved"].append((after_params - params).abs().max().item())
        out["reasons"].append(result.skip_reason.split(" (")[0] if result.skip_reason else None)
        out["norms"].append(engine.get_global_grad_norm())
    return out


@pytest.mark.parametrize("stage", [0, 2, 3])
@pytest.mark.parametrize("spike", [3.0, 0.0])
def test_a_vetoed_step_leaves_weights_and_adam_moments_untouched_at_zero_0_2_3(
    process_group: DistInfo, stage: int, spike: float
) -> None:
    got = run_stage(process_group, stage, spike)
    assert got["applied"] == [True, False, True, False]
    assert got["unchanged"] == [False, True, False, True]
    assert got["moved"][0] > 1e-5 and got["moved"][2] > 1e-5
    assert got["reasons"][1] == "loss is nan"
    spike_reason = got["reasons"][3]
    if spike > 0:  # the loss tests catch the 1000x loss first (here: above the ceiling)
        assert spike_reason.startswith("loss ") and "above 2 ln(vocab)" in spike_reason
    else:  # loss test off: the gradients are 1000x too, and the norm DeepSpeed computed vetoes the step
        assert spike_reason.startswith("gradient norm ") and "x the mean of the last 2 steps" in spike_reason
    # the norm of the clean steps is reported at every stage (DeepSpeed drops it at ZeRO-0 fp32; the guard keeps it)
    assert got["norms"][0] is not None and 0 < float(got["norms"][0]) < 100
