"""The train module owns what one optimizer step is: forward, backward and the update on the engine, the divergence
guard that may veto the update, the window of metrics the model reported since the last log line, and the fault hooks
the tests inject. The trainer keeps the cadence around it through these public methods and one state_dict."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lumina_ds.batch import Batch
from lumina_ds.distributed.collectives import all_reduce_sum, world_size
from lumina_ds.models.transformer import ModelOutput
from lumina_ds.training.backoff import StepOutOfMemoryError
from lumina_ds.training.engine import Engine
from lumina_ds.training.faults import FaultPlan
from lumina_ds.training.guard import (
    DivergenceGuard,
    LossScale,
    dynamic_loss_scale,
    install_step_gate,
    leave_the_floor_to_the_guard,
    scaler_overflow,
)
from lumina_ds.training.metrics import WindowMetrics

PhaseWrapper = Callable[[str, Callable[..., Any]], Callable[..., Any]]  # (phase name, call) -> the call, measured


@dataclass(frozen=True)
class StepResult:
    """What became of one optimizer step: applied, or skipped and why; `rewind` when the skips now call for one.
    `overflow`: not applied because fp16's loss scaler overflowed (by design; lowers the scale), which is no skip."""

    applied: bool
    skip_reason: str | None = None
    rewind: Rewind | None = None
    overflow: bool = False


@dataclass(frozen=True)
class Rewind:
    """The guard's call for a rewind: what happened, and the data steps whose batches the replay leaves out."""

    what: str
    left_out: list[int]
    max_rewinds: int


class TrainModule:
    """Optimizer steps on an engine. With a divergence guard, the step's loss is averaged over ranks before the update
    (one scalar all-reduce per step) and the guard may veto the update; a vetoed step's metrics stay out of the
    window. Wall time is counted for the training steps only (evaluation and checkpoints excluded)."""

    def __init__(
        self, engine: Engine, *, guard: DivergenceGuard | None = None, faults: FaultPlan | None = None
    ) -> None:
        self.engine = engine
        self._window = WindowMetrics()
        self._guard = guard
        self._faults = faults or FaultPlan([], rank=0)
        self._updating = False  # inside an optimizer step (between its first forward and its engine.step)
        self._forward: Callable[[Batch], ModelOutput] = self._plain_forward
        self._backward: Callable[[torch.Tensor], Any] = engine.backward
        self._optimizer_step: Callable[[], Any] = engine.step
        if guard is not None:
            install_step_gate(engine, guard)

    # ---- training ------------------------------------------------------------------------------------
    @property
    def in_update(self) -> bool:
        """Whether the last step stopped half done (gradients partly accumulated, the update not taken)."""
        return self._updating

    @property
    def micro_batch_size(self) -> int:
        return self.engine.train_micro_batch_size_per_gpu()

    def train_step(self, batches: Iterator[Batch], *, step: int, data_step: int) -> StepResult | None:
        """Optimizer step `step` on the engine's accumulation of micro-batches from `batches` (its data is data step
        `data_step`); None when the data ran out. Running out of memory is E204 with what to lower."""
        started = time.perf_counter()
        try:
            ran = self._run(batches, step=step)
        finally:
            self._window.seconds += time.perf_counter() - started
        if ran is None:
            return None
        applied, overflow = ran
        return self._judge(applied, overflow, step=step, data_step=data_step)

    def _run(self, batches: Iterator[Batch], *, step: int) -> tuple[bool, LossScale | None] | None:
        """(applied, the loss scale it overflowed at if the loss scaler skipped it); None when the data ran out."""
        # DeepSpeed scales each micro-batch's loss by 1/accumulation in backward and steps the optimizer on the last
        outputs: list[tuple[ModelOutput, int]] = []
        scale = self._loss_scale()
        accumulation = self.engine.gradient_accumulation_steps()
        for micro in range(accumulation):
            batch = next(batches, None)
            if batch is None:
                return None
            self._updating = True  # from the first forward on, an error leaves the step half done
            try:
                out = self._forward_backward(batch, first=micro == 0, step=step)
                outputs.append((out, batch.num_tokens))
                if micro == accumulation - 1 and self._guard is not None:
                    self._guard.judge_loss(mean_over_ranks([o["loss"] for o, _ in outputs]))
                self._optimizer_step()
            except (RuntimeError, MemoryError) as exc:
                if not is_out_of_memory(exc):
                    raise
                raise out_of_memory_error(batch, exc) from exc
        self._updating = False
        applied = self.engine.was_step_applied() and not (self._guard is not None and self._guard.vetoed)
        if applied or self._guard is None:
            for out, tokens in outputs:
                self._window.add(out, tokens=tokens)
        return applied, scaler_overflow(self.engine, scale)

    def _loss_scale(self) -> LossScale | None:
        """The fp16 loss scale this step's backward uses (read before it: an overflow lowers it)."""
        if self._guard is not None:  # every step: a checkpoint load replaces ZeRO's scaler object
            leave_the_floor_to_the_guard(self.engine.optimizer)
        return dynamic_loss_scale(self.engine.optimizer)

    def _forward_backward(self, batch: Batch, *, first: bool, step: int) -> ModelOutput:
        if first:
            self._faults.before_forward(step=step)
        out = self._forward(batch)
        if first:
            out["loss"] = self._faults.poison(out["loss"], step=step)
        self._backward(out["loss"])
        return out

    def _plain_forward(self, batch: Batch) -> ModelOutput:
        batch = batch.to(self.engine.device)
        return self.engine(batch.input_ids, labels=batch.labels, position_ids=batch.position_ids)

    def _judge(self, applied: bool, overflow: LossScale | None, *, step: int, data_step: int) -> StepResult:
        if self._guard is None:
            return StepResult(applied, overflow=overflow is not None)
        skip = self._guard.record(step=step, data_step=data_step, applied=applied, overflow=overflow)
        if skip is None:  # applied, or the loss scaler's overflow
            return StepResult(applied, overflow=not applied)
        guard = self._guard
        budget = f"{len(guard.skips)} of {guard.config.max_skips} skips allowed in {guard.config.window} steps"
        reason = f"{skip.reason} ({budget})"
        if not guard.rewind_due:
            return StepResult(False, reason)
        what = f"{len(guard.skips)} skipped steps within {guard.config.window} (steps {[s.step for s in guard.skips]})"
        rewind = Rewind(what, [s.data_step for s in guard.skips], guard.config.max_rewinds)
        return StepResult(False, reason, rewind)

    def skip_step(self, batches: Iterator[Batch]) -> bool:
        """Draw one step's micro-batches without training on them (batches a rewind leaves out); False at the end."""
        return all(next(batches, None) is not None for _ in range(self.engine.gradient_accumulation_steps()))

    def end_of_step(self, *, step: int) -> None:
        """Between two steps, where the run's state is consistent: the fault hook of a planted crash."""
        self._faults.after_step(step=step)

    def rewound(self) -> None:
        """The weights went back to a checkpoint: the guard forgets its skips and history, the window its sums."""
        if self._guard is not None:
            self._guard.rewound()
        self._window.reset()

    def wrap_phases(self, wrap: PhaseWrapper) -> None:
        """Measure the training forward, backward and optimizer step (not evaluation) through `wrap`."""
        self._forward = wrap("forward", self._forward)
        self._backward = wrap("backward", self._backward)
        self._optimizer_step = wrap("optimizer_step", self._optimizer_step)

    # ---- metrics -------------------------------------------------------------------------------------
    def losses_finite(self) -> bool:
        """Whether every loss since the last log line was finite (read back from the device now)."""
        return self._window.all_finite()

    def log_metrics(self) -> dict[str, Any] | None:
        """The window's means over micro-batches and ranks, tokens/s over the training steps' wall time, and the
        optimizer's state; the window starts again. None when every step since the last line was skipped (on every
        rank alike). Collective."""
        window = self._window
        if window.micro_batches == 0:
            return None
        metrics = window.summary()
        seconds = max(window.seconds, 1e-9)
        window.reset()
        metrics.update(self.optimizer_state(), tokens_per_s=metrics["tokens"] / seconds)
        return metrics

    def optimizer_state(self) -> dict[str, Any]:
        """Learning rate, gradient norm of the last step, and Adam's beta2, for the log line; under fp16's dynamic
        loss scaling also the loss scale."""
        grad_norm = self.engine.get_global_grad_norm()
        betas = self.engine.optimizer.param_groups[0].get("betas", (None, None))
        norm = float(grad_norm) if grad_norm is not None else float("nan")
        state = {"lr": float(self.engine.get_lr()[0]), "grad_norm": norm, "beta2": betas[1]}
        scale = dynamic_loss_scale(self.engine.optimizer)
        if scale is not None:
            state["loss_scale"] = scale.scale
        return state

    # ---- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_loss_sums(self, batches: Iterator[Batch]) -> torch.Tensor:
        """[2] float64: the token-weighted sum of the LM loss over `batches`, and their number of target tokens."""
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.engine.device)  # read back once, at the end
        for batch in batches:
            out = self._plain_forward(batch)
            targets = out["num_targets"].double()
            total += torch.stack([out["lm_loss"].double() * targets, targets])
        self.engine.train()
        return total.cpu()

    # ---- checkpointed state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to judge its next steps as the uninterrupted run would: the guard's history."""
        return {"guard": self._guard.state_dict()} if self._guard is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._guard is not None and "guard" in state:
            self._guard.load_state_dict(state["guard"])


def mean_over_ranks(losses: list[torch.Tensor]) -> float:
    """The mean of this step's micro-batch losses over every rank (one scalar all-reduce; reads the loss back)."""
    local = torch.stack([loss.detach().float().cpu() for loss in losses]).mean()
    return float(all_reduce_sum(local.reshape(1).double())[0]) / world_size()


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError on a GPU; on the CPU the allocator raises a RuntimeError (or Python a MemoryError)."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(exc)


def out_of_memory_error(batch: Batch, exc: BaseException) -> StepOutOfMemoryError:
    rows, seq_len = batch.input_ids.shape
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StepOutOfMemoryError(
        "E204",
        f"out of memory in a training step of {rows} rows x {seq_len} tokens: {first_line[:200]}",
        "lower --micro-batch-size (raise --grad-accum to keep the global batch) or --seq-len, turn on "
        "--gradient-checkpointing, or raise --zero-stage; `lumina-ds plan` and `analyze-memory` size a layout",
    )
