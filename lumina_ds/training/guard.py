"""The divergence guard: an optimizer step whose loss is non-finite or spikes, or whose gradient norm spikes, is not
applied; `max_skips` skipped steps within `window` steps rewind to the last verified checkpoint; after `max_rewinds`
rewinds the run stops with E301.

The veto happens inside DeepSpeed's `engine.step()`: the guard wraps the `step` of the torch optimizer that DeepSpeed
drives (inside ZeRO's or the bf16 optimizer's wrapper, or bare at ZeRO-0 fp32). DeepSpeed calls it after reducing the
gradients and computing their global norm, so both tests run on values every rank shares, and a skipped step leaves
weights and Adam moments exactly as they were (the LR schedule still advances, as for OLMo-core's skip-step AdamW).

Under fp16 DeepSpeed's dynamic loss scaler skips steps itself: it starts at 2^16 and lowers the scale on each overflow
of the scaled gradients, by design several times at the start of a run and again whenever it has raised the scale.
Such a step is an overflow, counted apart (`overflow_steps`), never a skip: only an overflow at the scale's minimum,
where lowering the scale cannot help any more, is divergence. A step the guard itself vetoes (a non-finite or spiking
loss, a spiking gradient norm) is a skip whatever the scaler did: the scale acts on the gradients, never on the loss.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lumina_ds.config.run import GuardConfig

if TYPE_CHECKING:
    from lumina_ds.training.engine import Engine


@dataclass(frozen=True)
class LossScale:
    """The dynamic fp16 loss scale DeepSpeed multiplies the loss by in backward, and the floor it cannot go below."""

    scale: float
    minimum: float

    @property
    def at_minimum(self) -> bool:
        return self.scale <= self.minimum


@dataclass(frozen=True)
class Skip:
    step: int  # the trainer's step number
    data_step: int  # which step-sized group of batches it trained on (see TrainState.data_steps)
    reason: str


class DivergenceGuard:
    def __init__(self, config: GuardConfig, *, vocab_size: int) -> None:
        self.config = config
        self.loss_ceiling = 2.0 * math.log(vocab_size)  # worse than a uniform guess by a factor of the vocabulary
        self.losses: deque[float] = deque(maxlen=config.window)  # of applied steps
        self.norms: deque[float] = deque(maxlen=config.window)
        self.skips: deque[Skip] = deque()  # within the last `window` steps
        self.rewinds = 0
        self._reason: str | None = None  # why the step in progress is vetoed
        self._norm_pending = False
        self._norm: float | None = None

    # ---- one step: judge_loss before engine.step(), the gate judges the norm inside it, record after it --------
    def judge_loss(self, loss: float) -> None:
        """The step's loss, averaged over micro-batches and ranks (so every rank decides alike)."""
        self._reason, self._norm, self._norm_pending = self._loss_problem(loss), None, True
        self._loss = loss

    def judge_grad_norm(self, norm: float | None) -> None:
        self._norm_pending = False
        self._norm = norm
        if self._reason is None and norm is not None:
            self._reason = self._norm_problem(norm)

    @property
    def vetoed(self) -> bool:
        return self._reason is not None

    def record(self, *, step: int, data_step: int, applied: bool, overflow: LossScale | None = None) -> Skip | None:
        """After engine.step(): the skip (None when applied, or when the loss scaler skipped it: see `_is_overflow`).
        `applied` is False also when DeepSpeed skipped the step itself (non-finite gradients under a loss scaler or
        its overflow check); `overflow`, the scale a loss-scaler overflow happened at."""
        while self.skips and self.skips[0].step <= step - self.config.window:
            self.skips.popleft()
        if applied and self._reason is None:
            self.losses.append(self._loss)
            if self._norm is not None and math.isfinite(self._norm):
                self.norms.append(self._norm)
            return None
        if self._is_overflow(applied=applied, overflow=overflow):
            return None
        reason = self._reason or "DeepSpeed found non-finite gradients"
        if self._reason is None and overflow is not None:
            reason = f"gradients overflow at the minimum fp16 loss scale ({overflow.minimum:g})"
        skip = Skip(step, data_step, reason)
        self.skips.append(skip)
        return skip

    def _is_overflow(self, *, applied: bool, overflow: LossScale | None) -> bool:
        """Whether the step just judged is the loss scaler's by-design overflow: not applied, not vetoed by the
        guard, and skipped by the scaler at a scale it could still lower."""
        return not applied and self._reason is None and overflow is not None and not overflow.at_minimum

    @property
    def rewind_due(self) -> bool:
        return len(self.skips) >= self.config.max_skips

    def rewound(self) -> list[int]:
        """Forget the skipped steps and the history (the weights are older now); the data steps to leave out."""
        data_steps = [skip.data_step for skip in self.skips]
        self.rewinds += 1
        self.skips.clear()
        self.losses.clear()
        self.norms.clear()  # the checkpoint's history, if it has one, is loaded next (Trainer.restore)
        return data_steps

    # ---- checkpointed with the trainer: a resumed run judges its next steps as the uninterrupted run would ----
    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "norms": list(self.norms),
                "skips": [[s.step, s.data_step, s.reason] for s in self.skips]}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses.clear()
        self.losses.extend(float(v) for v in state.get("losses", []))
        self.norms.clear()
        self.norms.extend(float(v) for v in state.get("norms", []))
        self.skips = deque(Skip(int(step), int(data_step), str(reason)) for step, data_step, reason in
                           state.get("skips", []))  # fmt: skip

    # ---- the tests ---------------------------------------------------------------------------------
    def _loss_problem(self, loss: float) -> str | None:
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if self.config.loss_spike and loss > self.loss_ceiling:
            return f"loss {loss:.4g} is above 2 ln(vocab) = {self.loss_ceiling:.3g}"
        return self._spike("loss", loss, self.losses, self.config.loss_spike)

    def _norm_problem(self, norm: float) -> str | None:
        if not math.isfinite(norm):
            return f"gradient norm is {norm}"
        return self._spike("gradient norm", norm, self.norms, self.config.grad_norm_spike)

    def _spike(self, what: str, value: float, history: deque[float], factor: float) -> str | None:
        if not factor or len(history) < min(self.config.min_history, self.config.window):
            return None
        mean = sum(history) / len(history)
        if value > factor * mean:
            return f"{what} {value:.4g} is {value / mean:.1f}x the mean of the last {len(history)} steps ({mean:.4g})"
        return None


def install_step_gate(engine: Engine, guard: DivergenceGuard) -> None:
    """Let `guard` veto the optimizer update inside `engine.step()`, once per step whatever the number of calls
    (ZeRO 1/2 step their torch optimizer once per parameter group, ZeRO-3 once per sub-group)."""
    wrapper = engine.optimizer
    base = getattr(wrapper, "optimizer", wrapper)  # ZeRO and the bf16/fp16 optimizers keep the torch one here
    read_norm = _wrapper_norm(wrapper) if base is not wrapper else _record_clipping_norm(engine)
    original = base.step

    def gated_step(*args: Any, **kwargs: Any) -> Any:
        if guard._norm_pending:
            guard.judge_grad_norm(read_norm())
        if guard.vetoed:
            return None
        return original(*args, **kwargs)

    if hasattr(original, "_wrapped_by_lr_sched"):  # torch's LR scheduler checks its wrapper is still in place
        gated_step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    base.step = gated_step


def _wrapper_norm(wrapper: Any) -> Callable[[], float | None]:
    # DeepSpeed's ZeRO 1-3 and bf16 optimizers set _global_grad_norm before they step the torch optimizer
    def read() -> float | None:
        norm = getattr(wrapper, "_global_grad_norm", None)
        return None if norm is None else float(norm)

    return read


def _record_clipping_norm(engine: Any) -> Callable[[], float | None]:
    """ZeRO-0 fp32 steps the torch optimizer bare; DeepSpeed computes the norm when clipping and drops it. Clip the
    same way, keeping the norm for the guard and for `get_global_grad_norm` (the log line's grad_norm)."""
    from deepspeed.runtime.utils import clip_grad_norm_

    latest: list[float | None] = [None]

    def clip_and_keep() -> None:
        norm = clip_grad_norm_(parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
                               mpu=engine.mpu)  # fmt: skip
        latest[0] = engine._global_grad_norm = float(norm)

    engine.clip_fp32_gradients = clip_and_keep

    def read() -> float | None:
        norm, latest[0] = latest[0], None
        return norm

    return read


# ---- DeepSpeed's fp16 loss scaler, as the engine reports it ----------------------------------------------------
def dynamic_loss_scale(optimizer: Any) -> LossScale | None:
    """The dynamic loss scale of DeepSpeed's optimizer wrapper now; None without one (fp32, bf16, a static scale).

    ZeRO 1-3 keep a `DynamicLossScaler` as `loss_scaler` (a static `LossScaler`, `dynamic` False, at fp32/bf16);
    ZeRO-0's fp16 optimizers keep a `LossScaleConfig` as `loss_scale_config`."""
    scaler = getattr(optimizer, "loss_scaler", None)
    if scaler is not None and getattr(scaler, "dynamic", False):
        return LossScale(float(scaler.cur_scale), float(scaler.min_scale))
    config = getattr(optimizer, "loss_scale_config", None)
    if config is not None and getattr(config, "dynamic_loss_scale", False):
        return LossScale(float(config.cur_scale), float(config.min_loss_scale))
    return None


def scaler_overflow(engine: Engine, before: LossScale | None) -> LossScale | None:
    """`before` (the scale the step's backward used) when the loss scaler skipped the step just taken: the engine
    did not apply it because its optimizer wrapper reported an overflow (`DeepSpeedEngine._take_model_step` sets
    `was_step_applied()` from `optimizer.overflow`); None otherwise."""
    if before is None or engine.was_step_applied():
        return None
    return before if getattr(engine.optimizer, "overflow", False) else None


def leave_the_floor_to_the_guard(optimizer: Any) -> None:
    """ZeRO's `DynamicLossScaler` raises a bare Exception ("Current loss scale already at minimum") on an overflow
    at its minimum scale. The guard judges that step instead (a skip, then a rewind or E301), so the scaler only skips
    it, as ZeRO-0's fp16 optimizers do."""
    scaler = getattr(optimizer, "loss_scaler", None)
    if scaler is not None and getattr(scaler, "dynamic", False):
        scaler.raise_error_at_min_scale = False
