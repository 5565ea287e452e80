"""The trainer keeps the cadence: step, log, evaluate, save, stop, rewind. What a step is belongs to the train module
(read through its public methods only), the model's extra metrics pass through as a dict, and what a log record means
is the callbacks' business."""

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
from lumina_ds.data.train_data import PackedBatches, PackedDataset
from lumina_ds.distributed.collectives import Arrival, all_ranks_arrive, all_reduce, all_reduce_sum, any_rank
from lumina_ds.distributed.env import DistInfo
from lumina_ds.distributed.peers import lost_connection
from lumina_ds.errors import CheckpointError, TrainingError
from lumina_ds.monitor.callbacks import Callback
from lumina_ds.training.checkpoint import CheckpointManager
from lumina_ds.training.checkpoint_state import Resumed
from lumina_ds.training.metrics import memory_summary, perplexity
from lumina_ds.training.signal_lead import SignalLead
from lumina_ds.training.train_module import Rewind, TrainModule

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
EMERGENCY_WAIT_S = 60.0  # how long a rank with an error waits for the others before saving without them


@dataclass
class TrainState:
    step: int = 0
    best_eval_loss: float = math.inf
    best_step: int = 0
    evals_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # evaluation results
    data_steps: int = 0  # step-sized groups of batches drawn from the data: trained, skipped or left out
    skipped_steps: int = 0  # optimizer steps the divergence guard did not apply
    overflow_steps: int = 0  # optimizer steps fp16's loss scaler skipped for an overflow (by design, not divergence)
    rewinds: int = 0
    left_out: list[int] = field(default_factory=list)  # data steps a rewind leaves out (the offending batches)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Trainer:
    def __init__(
        self,
        *,
        module: TrainModule,
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
        self.module = module
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
        self._last_saved = -1
        self._previous_handlers: dict[int, Any] = {}
        self.signal_lead = SignalLead()  # printed after the first save: how early a stop signal must come

    # ---- checkpoint state -------------------------------------------------------------------------
    def restore(self, resumed: Resumed) -> None:
        self.state = TrainState(**resumed.trainer)
        self.module.load_state_dict(resumed.module)
        self.batches.load_state_dict(resumed.data)

    def _best_step(self) -> int | None:
        """The best evaluation's step, whose tag rotation keeps (None before any evaluation)."""
        return self.state.best_step if self.state.history else None

    def save(self, *, final: bool = False) -> None:
        self._check_finite()  # never checkpoint diverged weights
        best = self._best_step()
        state = {"trainer": self.state.as_dict(), "module": self.module.state_dict(), "config": self.config_record}
        first = self.checkpoints.last_save_seconds is None
        self.checkpoints.save(self.module.engine, self.state.step, state=state, data=self.batches.state_dict(),
                              keep_step=best, final=final)  # fmt: skip
        if first and not final:
            self._say(self.signal_lead.advice(save_s=self.checkpoints.last_save_seconds or 0.0))

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        self._install_signal_handlers()
        for cb in self.callbacks:
            cb.on_train_start({"total_steps": self.total_steps, "start_step": self.state.step})
        start = time.time()
        self._last_saved = self.state.step if self.state.step else -1  # a resumed run's tag is this step's
        self._start_step = self.state.step
        try:
            try:
                stop_reason = self._loop(start)
            except Exception as exc:
                self._emergency_checkpoint(exc)
                raise
            return self._finish(stop_reason, time.time() - start)
        finally:
            self._restore_signal_handlers()
            for cb in self.callbacks:
                cb.close()

    def _loop(self, start: float) -> str:
        """Steps until the end; the reason training stopped."""
        iterator = iter(self.batches)
        while self.state.step < self.total_steps:
            if self.state.data_steps + 1 in self.state.left_out:  # batches a rewind left out
                self.state.data_steps += 1
                if not self.module.skip_step(iterator):
                    return "data exhausted"
                continue
            began = time.perf_counter()
            result = self.module.train_step(iterator, step=self.state.step + 1, data_step=self.state.data_steps + 1)
            self.signal_lead.step_done(time.perf_counter() - began)
            if result is None:
                return "data exhausted"
            self.state.data_steps += 1
            self.state.step += 1
            if result.overflow:
                self.state.overflow_steps += 1
            if result.skip_reason is not None:
                self.state.skipped_steps += 1
                self._say(f"warning: step {self.state.step} not applied: {result.skip_reason}")
            if result.rewind is not None:
                self._rewind(result.rewind)
                iterator = iter(self.batches)  # rewound: the data continues from the checkpoint's position
                continue
            self.module.end_of_step(step=self.state.step)
            stop_reason = self._after_step(start)
            if stop_reason:
                return stop_reason
        return "max_steps"

    def _after_step(self, start: float) -> str | None:
        """Log, check signals, evaluate and save after step `state.step`; a reason to stop, if any. A stop signal is
        checked before the evaluation: the time a scheduler's warning leaves goes to the checkpoint (saved by
        _finish), not to an evaluation."""
        for cb in self.callbacks:
            cb.on_step(self.state.step)
        if self.state.step % self.logging.log_every_n_steps == 0 or self.state.step == self.total_steps:
            self._log(time.time() - start)
        if self._signalled():
            return f"signal {signal.Signals(self._stop_signal or signal.SIGTERM).name}"
        evaluate_now = self.eval_data is not None and self.state.step % self.train_config.eval_every_n_steps == 0
        if evaluate_now and self._evaluate_and_check_patience():
            return "early stopping"
        if self.checkpoints.due(self.state.step):
            self.save()
            self._last_saved = self.state.step
        return None

    # ---- divergence: rewind or stop ----------------------------------------------------------------
    def _rewind(self, rewind: Rewind) -> None:
        """Back to the newest verified checkpoint; the skipped steps' batches are left out when the data replays."""
        hint = ("lower --learning-rate, raise --warmup-ratio, lower --max-grad-norm, or use --precision bf16/fp32; "
                "every checkpoint saved was taken before the divergence")  # fmt: skip
        if self.state.rewinds >= rewind.max_rewinds:
            raise TrainingError("E301", f"training diverged: {rewind.what} after {self.state.rewinds} rewind(s)", hint)
        resumed = self.checkpoints.load_newest(self.module.engine, log=self._say)
        if resumed is None:
            raise TrainingError("E301", f"training diverged: {rewind.what} and no verified checkpoint to rewind to",
                                hint)  # fmt: skip
        kept = {"rewinds": self.state.rewinds + 1, "skipped_steps": self.state.skipped_steps,
                "overflow_steps": self.state.overflow_steps,
                "left_out": sorted(set(self.state.left_out) | set(rewind.left_out))}  # fmt: skip
        self.module.rewound()  # before restore: the checkpoint's guard history is loaded next
        self.restore(resumed)
        self.state.__dict__.update(kept)
        self._last_saved = self.state.step
        self._say(f"rewound to step {self.state.step} ({resumed.tag_dir.name}) after {rewind.what}; the batches of "
                  f"those steps are left out (rewind {self.state.rewinds} of {rewind.max_rewinds})")  # fmt: skip

    # ---- an exception in the loop ------------------------------------------------------------------
    def _emergency_checkpoint(self, exc: Exception) -> None:
        """A checkpoint of the last completed step when that state is consistent (between steps, every rank there,
        finite); otherwise one line saying why not."""
        reason = self._inconsistent_after(exc)
        if reason is None:
            reason = arrival_problem(all_ranks_arrive(timeout_s=EMERGENCY_WAIT_S), wait_s=EMERGENCY_WAIT_S)
        if reason is None and any_rank(not self.module.losses_finite()):
            reason = "a loss since the last log line was not finite"
        if reason is not None:
            self._say(f"no emergency checkpoint after {type(exc).__name__}: {reason}")
            return
        try:
            self.save()
        except Exception as failure:  # the original error is the one to report
            self._say(f"no emergency checkpoint after {type(exc).__name__}: saving failed ({failure})")
            return
        self._say(f"emergency checkpoint of step {self.state.step} saved after {type(exc).__name__}")

    def _inconsistent_after(self, exc: Exception) -> str | None:
        if isinstance(exc, TrainingError):
            return "the run diverged"
        if isinstance(exc, CheckpointError):
            return "checkpoints cannot be written or read"
        if self.module.in_update:
            return f"it came inside optimizer step {self.state.step + 1}, with gradients partly accumulated"
        if self._last_saved == self.state.step:
            return f"the checkpoint of step {self.state.step} is current"
        if lost_connection(exc):  # no save can complete; the wait for every rank below would not end on ranks != 0
            return "a peer's process or host is gone (its connection was lost)"
        return None

    def _say(self, message: str) -> None:
        if self.info.is_main:
            print(message, flush=True)

    @property
    def exit_code(self) -> int:
        """128 + the signal that stopped the run (as a shell reports a killed process), so a scheduler or a requeue
        script can tell pre-emption from completion; 0 otherwise."""
        return 128 + int(self._stop_signal) if self._stop_signal is not None else 0

    def _finish(self, stop_reason: str, elapsed: float) -> dict[str, Any]:
        evaluated = bool(self.state.history) and self.state.history[-1]["step"] == self.state.step
        if self.eval_data is not None and not evaluated and self._stop_signal is None:
            self._evaluate_and_check_patience()
        natural_end = self._stop_signal is None  # a signal stop saves only what the next launch needs
        if self._last_saved != self.state.step:
            self.save(final=natural_end)
        elif natural_end:
            self.checkpoints.add_weights(self.module.engine, self.state.step, keep_step=self._best_step())
        summary = {"steps": self.state.step, "stop_reason": stop_reason, "elapsed_s": round(elapsed, 1),
                   "exit_code": self.exit_code, "skipped_steps": self.state.skipped_steps,
                   "overflow_steps": self.state.overflow_steps, "rewinds": self.state.rewinds}  # fmt: skip
        if self.state.history:
            summary["final_eval_loss"] = round(self.state.history[-1]["eval_loss"], 4)
        for cb in self.callbacks:
            cb.on_train_end(summary)
        return summary

    def _check_finite(self) -> None:
        """E301 when a loss since the last log line was NaN/inf (checked per log line and before every save).

        Collective, so that every rank raises together rather than some waiting in the next all-reduce.
        """
        if any_rank(not self.module.losses_finite()):
            raise TrainingError(
                "E301",
                f"non-finite loss within the {self.logging.log_every_n_steps} steps up to step {self.state.step}: "
                "training diverged",
                "lower --learning-rate, raise --warmup-ratio, lower --max-grad-norm, or use --precision bf16/fp32; "
                "resume from the last checkpoint (it was saved before the divergence)",
            )

    def _log(self, elapsed: float) -> None:
        self._check_finite()
        metrics = self.module.log_metrics()  # collective: every rank calls it
        if metrics is None:  # every step since the last line was skipped (on every rank alike)
            return
        metrics.update(
            step=self.state.step,
            epoch=self.batches.epoch,
            total_steps=self.total_steps,
            elapsed_s=elapsed,
            eta_s=self._eta(elapsed),
            memory=memory_summary(),
            skipped_steps=self.state.skipped_steps,
            overflow_steps=self.state.overflow_steps,
            rewinds=self.state.rewinds,
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
        loss_sum, targets = all_reduce_sum(self.module.eval_loss_sums(self._eval_batches())).tolist()
        loss = loss_sum / max(targets, 1.0)
        return {"step": self.state.step, "eval_loss": loss, "eval_ppl": perplexity(loss), "eval_tokens": int(targets)}

    def _eval_batches(self) -> Iterator[Batch]:
        """This rank's share of the eval rows, in batches of the same shape on every rank.

        Equal shapes keep collectives in step: ZeRO-3 gathers and the native MoE's all-to-all (whose capacity
        depends on the batch's token count) would otherwise deadlock or crash. Padding rows carry no targets.
        """
        assert self.eval_data is not None
        n, world, size = len(self.eval_data), self.info.world_size, self.module.micro_batch_size
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
                self._previous_handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self) -> None:
        """The process's own handlers come back once the loop ends (a caller in the same process keeps its Ctrl-C)."""
        for sig, previous in self._previous_handlers.items():
            signal.signal(sig, previous)
        self._previous_handlers.clear()


def arrival_problem(arrival: Arrival, *, wait_s: float) -> str | None:
    """Why the ranks did not all reach the emergency checkpoint, as it happened (None: they did). A wait that ran out
    means a rank is elsewhere (stuck in a collective, the error not on it); a wait cut short means the group failed,
    most often because a rank's process ended and closed its connections."""
    if arrival.arrived:
        return None
    who = (
        f"rank {', '.join(map(str, arrival.missing))} did not reach it"
        if arrival.missing
        else "not every rank was seen to reach it"
    )
    if arrival.timed_out:
        return f"{who} within {wait_s:.0f} s (the error was not on every rank)"
    return f"{who}: the wait failed after {arrival.seconds:.1f} s of the {wait_s:.0f} s allowed ({arrival.cause})"
