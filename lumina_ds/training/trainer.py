"""The trainer keeps the cadence: step, log, evaluate, save, stop. Forward and backward are the TrainStep's, the
model's extra metrics pass through as a dict, and what a log record means is the callbacks' business."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from lumina_ds.batch import Batch
from lumina_ds.config.run import LoggingConfig, TrainConfig
from lumina_ds.data.packing import PackedDataset
from lumina_ds.data.stream import PackedBatches
from lumina_ds.distributed.collectives import all_reduce, all_reduce_sum, any_rank
from lumina_ds.distributed.env import DistInfo
from lumina_ds.errors import TrainingError
from lumina_ds.monitor.callbacks import Callback
from lumina_ds.training.checkpoint import CheckpointManager, Resumed
from lumina_ds.training.metrics import memory_summary, perplexity
from lumina_ds.training.train_step import Engine, TrainStep

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@dataclass
class TrainState:
    step: int = 0
    best_eval_loss: float = math.inf
    best_step: int = 0
    evals_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # evaluation results

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Trainer:
    def __init__(
        self,
        *,
        step: TrainStep,
        batches: PackedBatches,
        eval_data: PackedDataset | None,
        info: DistInfo,
        total_steps: int,
        train: TrainConfig,
        logging: LoggingConfig,
        checkpoints: CheckpointManager,
        callbacks: list[Callback],
        config_record: dict[str, Any],
    ) -> None:
        self.step = step
        self.batches = batches
        self.eval_data = eval_data
        self.info = info
        self.total_steps = total_steps
        self.train_config, self.logging = train, logging
        self.checkpoints = checkpoints
        self.callbacks = callbacks  # the caller gives them to rank 0 only
        self.config_record = config_record  # the resolved run config, saved with every checkpoint
        self.state = TrainState()
        self._stop_signal: int | None = None
        self._start_step = 0

    @property
    def engine(self) -> Engine:
        return self.step.engine

    # ---- checkpoint state -------------------------------------------------------------------------
    def restore(self, resumed: Resumed) -> None:
        self.state = TrainState(**resumed.trainer)
        self.batches.load_state_dict(resumed.data)

    def save(self) -> None:
        self._check_finite()  # never checkpoint diverged weights
        best = self.state.best_step if self.state.history else None  # kept out of rotation
        self.checkpoints.save(self.engine, self.state.step, trainer=self.state.as_dict(),
                              data=self.batches.state_dict(), config=self.config_record,
                              keep_step=best)  # fmt: skip

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        self._install_signal_handlers()
        for cb in self.callbacks:
            cb.on_train_start({"total_steps": self.total_steps, "start_step": self.state.step})
        start = time.time()
        last_saved = self.state.step if self.state.step else -1  # a resumed run's tag is this step's checkpoint
        self._start_step = self.state.step
        iterator = iter(self.batches)
        stop_reason = "max_steps"
        while self.state.step < self.total_steps:
            step_start = time.perf_counter()
            more = self.step.run(iterator)
            self.step.window.seconds += time.perf_counter() - step_start  # eval and checkpoint time excluded
            if not more:
                stop_reason = "data exhausted"
                break
            self.state.step += 1
            for cb in self.callbacks:
                cb.on_step(self.state.step)
            if self.state.step % self.logging.log_every_n_batches == 0 or self.state.step == self.total_steps:
                self._log(time.time() - start)
            evaluate_now = self.eval_data is not None and self.state.step % self.train_config.eval_every_n_batches == 0
            if evaluate_now and self._evaluate_and_check_patience():
                stop_reason = "early stopping"
                break
            if self.checkpoints.due(self.state.step):
                self.save()
                last_saved = self.state.step
            if self._signalled():
                stop_reason = f"signal {signal.Signals(self._stop_signal or signal.SIGTERM).name}"
                break
        return self._finish(stop_reason, last_saved, time.time() - start)

    @property
    def exit_code(self) -> int:
        """128 + the signal that stopped the run (as a shell reports a killed process), so a scheduler or a requeue
        script can tell pre-emption from completion; 0 otherwise."""
        return 128 + int(self._stop_signal) if self._stop_signal is not None else 0

    def _finish(self, stop_reason: str, last_saved: int, elapsed: float) -> dict[str, Any]:
        if self.eval_data is not None and (not self.state.history or self.state.history[-1]["step"] != self.state.step):
            self._evaluate_and_check_patience()
        if last_saved != self.state.step:
            self.save()
        summary = {"steps": self.state.step, "stop_reason": stop_reason, "elapsed_s": round(elapsed, 1),
                   "exit_code": self.exit_code}  # fmt: skip
        if self.state.history:
            summary["final_eval_loss"] = round(self.state.history[-1]["eval_loss"], 4)
        for cb in self.callbacks:
            cb.on_train_end(summary)
        return summary

    def _check_finite(self) -> None:
        """E301 when a loss since the last log line was NaN/inf (checked per log line and before every save).

        Collective, so that every rank raises together rather than some waiting in the next all-reduce.
        """
        if any_rank(not self.step.window.all_finite()):
            raise TrainingError(
                "E301",
                f"non-finite loss within the {self.logging.log_every_n_batches} steps up to step {self.state.step}: "
                "training diverged",
                "lower --learning-rate, raise --warmup-ratio, lower --max-grad-norm, or use --precision bf16/fp32; "
                "resume from the last checkpoint (it was saved before the divergence)",
            )

    def _log(self, elapsed: float) -> None:
        self._check_finite()
        window = self.step.window
        metrics = window.summary()  # collective: every rank calls it
        seconds = max(window.seconds, 1e-9)
        window.reset()
        metrics.update(
            self.step.optimizer_state(),
            step=self.state.step,
            epoch=self.batches.epoch,
            total_steps=self.total_steps,
            tokens_per_s=metrics["tokens"] / seconds,  # all ranks' tokens over the training steps' wall time
            elapsed_s=elapsed,
            eta_s=self._eta(elapsed),
            memory=memory_summary(),
        )
        for cb in self.callbacks:
            cb.on_log(metrics)

    def _eta(self, elapsed: float) -> float:
        """Seconds left at this session's average pace (evaluations and checkpoints included)."""
        done = self.state.step - self._start_step
        return elapsed / max(done, 1) * (self.total_steps - self.state.step)

    # ---- evaluation -------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        """Token-weighted mean loss over the whole eval set, rows sharded over ranks (padded so all ranks step)."""
        loss_sum, targets = all_reduce_sum(self.step.loss_sums(self._eval_batches())).tolist()
        loss = loss_sum / max(targets, 1.0)
        return {"step": self.state.step, "eval_loss": loss, "eval_ppl": perplexity(loss), "eval_tokens": int(targets)}

    def _eval_batches(self) -> Iterator[Batch]:
        """This rank's share of the eval rows, in batches of the same shape on every rank.

        Equal shapes keep collectives in step: ZeRO-3 gathers and the native MoE's all-to-all (whose capacity
        depends on the batch's token count) would otherwise deadlock or crash. Padding rows carry no targets.
        """
        assert self.eval_data is not None
        n, world, size = len(self.eval_data), self.info.world_size, self.engine.train_micro_batch_size_per_gpu()
        mine = list(range(self.info.rank, n, world))
        per_rank = -(-n // world)
        for begin in range(0, per_rank, size):
            rows = min(size, per_rank - begin)
            chunk = mine[begin : begin + rows]
            yield self.eval_data.batch(chunk + [0] * (rows - len(chunk))).without_targets(len(chunk))

    def _evaluate_and_check_patience(self) -> bool:
        """Evaluate, track the best; True when early stopping should end training."""
        result = self.evaluate()
        state = self.state
        if result["eval_loss"] < state.best_eval_loss:
            state.best_eval_loss, state.best_step, state.evals_without_improvement = result["eval_loss"], state.step, 0
        else:
            state.evals_without_improvement += 1
        result.update(best_eval_ppl=perplexity(state.best_eval_loss), best_step=state.best_step)
        state.history.append(result)
        for cb in self.callbacks:
            cb.on_eval(result)
        patience = self.train_config.early_stopping_patience
        return patience is not None and state.evals_without_improvement >= patience

    # ---- signals ----------------------------------------------------------------------------------
    def _signalled(self) -> bool:
        """Whether any rank got a stop signal (all ranks then stop at this step, agreeing on which signal)."""
        agreed = int(all_reduce(torch.tensor([float(self._stop_signal or 0)]), dist.ReduceOp.MAX)[0])
        if agreed:
            self._stop_signal = agreed
        return bool(agreed)

    def _install_signal_handlers(self) -> None:
        """SIGTERM, SIGINT and SIGUSR1 (SLURM's usual warning before the time limit) end training at the next step
        boundary with a complete checkpoint (never mid-save)."""

        def handler(signum: int, _frame: Any) -> None:
            self._stop_signal = signum

        for sig in STOP_SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread (e.g. under a test runner thread)
                signal.signal(sig, handler)
