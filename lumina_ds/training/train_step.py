"""One optimizer step (forward, backward and the model's metrics over the accumulated micro-batches) behind the slice
of DeepSpeed's engine it needs. The trainer only keeps the cadence around it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn

from lumina_ds.batch import Batch
from lumina_ds.distributed.collectives import all_reduce_sum, world_size
from lumina_ds.models.transformer import ModelOutput
from lumina_ds.training.backoff import StepOutOfMemoryError
from lumina_ds.training.faults import FaultPlan
from lumina_ds.training.guard import DivergenceGuard, install_step_gate
from lumina_ds.training.metrics import WindowMetrics


class Engine(Protocol):
    """What the training step and the trainer use of `deepspeed.DeepSpeedEngine`."""

    device: torch.device
    module: nn.Module
    optimizer: Any

    def __call__(
        self, input_ids: torch.Tensor, *, labels: torch.Tensor, position_ids: torch.Tensor
    ) -> ModelOutput: ...  # fmt: skip

    def backward(self, loss: torch.Tensor) -> Any: ...

    def step(self) -> None: ...

    def gradient_accumulation_steps(self) -> int: ...

    def train_micro_batch_size_per_gpu(self) -> int: ...

    def get_global_grad_norm(self) -> float | None: ...

    def get_lr(self) -> list[float]: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any], save_latest: bool) -> Any: ...

    def load_checkpoint(self, load_dir: str, tag: str) -> tuple[str | None, dict[str, Any] | None]: ...

    def was_step_applied(self) -> bool: ...


class TrainStep:
    """Runs optimizer steps on an engine and keeps the window of metrics the model reported since the last log.

    With a divergence guard, the step's loss is averaged over ranks before the update (one scalar all-reduce per
    step) and the guard may veto the update; a vetoed step's metrics stay out of the window.
    """

    def __init__(
        self, engine: Engine, *, guard: DivergenceGuard | None = None, faults: FaultPlan | None = None
    ) -> None:
        self.engine = engine
        self.window = WindowMetrics()
        self.guard = guard
        self.faults = faults or FaultPlan([], rank=0)
        self.updating = False  # inside an optimizer step (between its first forward and its engine.step)
        if guard is not None:
            install_step_gate(engine, guard)

    def forward(self, batch: Batch) -> ModelOutput:
        batch = batch.to(self.engine.device)
        return self.engine(batch.input_ids, labels=batch.labels, position_ids=batch.position_ids)

    def run(self, batches: Iterator[Batch], *, step: int = 0) -> bool | None:
        """Optimizer step `step` = the engine's accumulation steps of micro-batches: whether the update was applied,
        None when the data ran out.

        DeepSpeed scales each micro-batch's loss by 1/accumulation in backward and steps the optimizer on the last.
        Running out of memory is E204 with what to lower, not a page of allocator traceback.
        """
        outputs: list[tuple[ModelOutput, int]] = []
        accumulation = self.engine.gradient_accumulation_steps()
        for micro in range(accumulation):
            batch = next(batches, None)
            if batch is None:
                return None
            self.updating = True  # from the first forward on, an error leaves the step half done
            try:
                out = self._forward_backward(batch, poison=micro == 0, step=step)
                outputs.append((out, batch.num_tokens))
                if micro == accumulation - 1 and self.guard is not None:
                    self.guard.judge_loss(mean_over_ranks([o["loss"] for o, _ in outputs]))
                self.engine.step()
            except (RuntimeError, MemoryError) as exc:
                if not is_out_of_memory(exc):
                    raise
                raise out_of_memory_error(batch, exc) from exc
        self.updating = False
        applied = self.engine.was_step_applied() and not (self.guard is not None and self.guard.vetoed)
        if applied or self.guard is None:
            for out, tokens in outputs:
                self.window.add(out, tokens=tokens)
        return applied

    def _forward_backward(self, batch: Batch, *, poison: bool, step: int) -> ModelOutput:
        if poison:
            self.faults.before_forward(step=step)
        out = self.forward(batch)
        if poison:
            out["loss"] = self.faults.poison(out["loss"], step=step)
        self.engine.backward(out["loss"])
        return out

    def discard(self, batches: Iterator[Batch]) -> bool:
        """Draw one step's micro-batches without training on them (batches a rewind leaves out); False at the end."""
        return all(next(batches, None) is not None for _ in range(self.engine.gradient_accumulation_steps()))

    @torch.no_grad()
    def loss_sums(self, batches: Iterator[Batch]) -> torch.Tensor:
        """[2] float64: the token-weighted sum of the LM loss over `batches`, and their number of target tokens."""
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.engine.device)  # read back once, at the end
        for batch in batches:
            out = self.forward(batch)
            targets = out["num_targets"].double()
            total += torch.stack([out["lm_loss"].double() * targets, targets])
        self.engine.train()
        return total.cpu()

    def optimizer_state(self) -> dict[str, Any]:
        """Learning rate, gradient norm of the last step, and Adam's beta2, for the log line."""
        grad_norm = self.engine.get_global_grad_norm()
        betas = self.engine.optimizer.param_groups[0].get("betas", (None, None))
        return {
            "lr": float(self.engine.get_lr()[0]),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "beta2": betas[1],
        }


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
