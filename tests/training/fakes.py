"""A plain-torch stand-in for DeepSpeed's engine and the pieces a trainer is built from, so that the loop, the guard,
rewinds, emergency checkpoints and resumes run in this process in well under a second each.

The engine keeps DeepSpeed's shape where the train module looks: the torch optimizer sits inside a wrapper that
records the global gradient norm before it steps it (what ZeRO's optimizers do), so the divergence guard gates the same
call; save_checkpoint/load_checkpoint write and read the module's and optimizer's state as tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lumina_ds.config.run import CheckpointConfig, GuardConfig, LoggingConfig, TrainConfig
from lumina_ds.data.loading.mixture import Mixture
from lumina_ds.data.loading.packing import PackedDataset, PackedRows
from lumina_ds.data.loading.stream import PackedBatches, RankView, RowPacker
from lumina_ds.data.prepare.documents import TokenizedDocs, TokenizedPart
from lumina_ds.distributed.env import DistInfo
from lumina_ds.models.config import ModelConfig, MoEConfig
from lumina_ds.models.transformer import Transformer
from lumina_ds.monitor.callbacks import Callback
from lumina_ds.training.checkpoint import CheckpointManager, PlainLoader
from lumina_ds.training.faults import FaultPlan, parse_faults
from lumina_ds.training.guard import DivergenceGuard
from lumina_ds.training.train_module import TrainModule
from lumina_ds.training.trainer import Trainer

INFO = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
STATE_FILE = "fake_engine.pt"


class WrappedOptimizer:
    """DeepSpeed's optimizer wrappers keep the torch optimizer as `.optimizer` and set `_global_grad_norm`."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._global_grad_norm: float | None = None

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups


class FakeEngine:
    """The slice of DeepSpeedEngine the train module, trainer and checkpoints use, over a plain module and AdamW."""

    def __init__(self, model: torch.nn.Module, *, accum: int = 1, micro: int = 2, lr: float = 1e-2) -> None:
        self.module = model
        self.optimizer = WrappedOptimizer(torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95)))
        self.device = torch.device("cpu")
        self.accum, self.micro, self.micro_steps, self.lr = accum, micro, 0, lr
        self.saved: list[str] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accum:
            return
        params = [p for p in self.module.parameters() if p.grad is not None]
        self.optimizer._global_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))
        self.optimizer.optimizer.step()  # the guard's gate wraps this call
        self.optimizer.optimizer.zero_grad()

    def gradient_accumulation_steps(self) -> int:
        return self.accum

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.micro

    def get_global_grad_norm(self) -> float | None:
        return self.optimizer._global_grad_norm

    def was_step_applied(self) -> bool:
        return True

    def get_lr(self) -> list[float]:
        return [self.lr]

    def eval(self) -> None:
        self.module.eval()

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any], save_latest: bool) -> None:
        target = Path(save_dir) / tag
        target.mkdir(parents=True, exist_ok=True)
        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.optimizer.state_dict()}
        torch.save(state, target / STATE_FILE)
        self.saved.append(tag)

    def load_checkpoint(self, load_dir: str, tag: str) -> tuple[str | None, dict[str, Any] | None]:
        path = Path(load_dir) / tag / STATE_FILE
        state = torch.load(path, weights_only=True)
        self.module.load_state_dict(state["module"])
        self.optimizer.optimizer.load_state_dict(state["optimizer"])
        return str(path.parent), {}


class Fp16Optimizer(WrappedOptimizer):
    """ZeRO's fp16 wrapper where the train module looks: DeepSpeed's own dynamic loss scaler as `loss_scaler`, built
    as ZeRO builds it (CreateLossScaler with the config's fp16 section), and `overflow`, the last step's verdict.
    The scaler logs through deepspeed.comm on an overflow: tests that use it need the `process_group` fixture."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, initial_scale_power: int, min_scale: float) -> None:
        from deepspeed.runtime.fp16 import loss_scaler as ds

        super().__init__(optimizer)
        args = {ds.INITIAL_LOSS_SCALE: 2.0**initial_scale_power, ds.SCALE_WINDOW: 1000, ds.DELAYED_SHIFT: 2,
                ds.CONSECUTIVE_HYSTERESIS: False, ds.MIN_LOSS_SCALE: min_scale}  # fmt: skip
        self.loss_scaler = ds.CreateLossScaler(torch.half, 0, True, args)
        self.overflow = False


class FakeFp16Engine(FakeEngine):
    """fp16 under ZeRO as the train module sees it: at an optimizer step whose gradients overflow (non-finite, or at
    the steps in `overflow_at`, as a loss scale too high for fp16 makes them) the loss scaler lowers its scale and
    the step is not applied (`was_step_applied()` False, `optimizer.overflow` True, as DeepSpeedEngine reports it)."""

    def __init__(
        self, model: torch.nn.Module, *, overflow_at: set[int], initial_scale_power: int = 16, min_scale: float = 1,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(model, **kwargs)
        self.fp16 = Fp16Optimizer(self.optimizer.optimizer, initial_scale_power=initial_scale_power,
                                  min_scale=min_scale)  # fmt: skip
        self.optimizer = self.fp16
        self.overflow_at = overflow_at
        self.applied = True

    def step(self) -> None:
        if (self.micro_steps + 1) % self.accum:  # not an accumulation boundary
            super().step()
            return
        step = (self.micro_steps + 1) // self.accum
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        overflow = step in self.overflow_at or not all(bool(torch.isfinite(g).all()) for g in grads)
        self.fp16.overflow, self.applied = overflow, not overflow
        self.fp16.loss_scaler.update_scale(overflow)  # raises at the floor unless told not to
        if not overflow:
            super().step()
            return
        self.micro_steps += 1
        self.optimizer._global_grad_norm = float("inf")
        self.optimizer.optimizer.zero_grad()

    def was_step_applied(self) -> bool:
        return self.applied


def docs(n: int, seq_len: int = 16, seed: int = 0) -> TokenizedDocs:
    """n random conversations of 5..seq_len-1 tokens, every next token a target."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, seq_len, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    targets = np.ones(offsets[-1], dtype=np.uint8)
    targets[offsets[1:] - 1] = 0
    tokens = rng.integers(6, 64, size=offsets[-1]).astype(np.int32)
    return TokenizedDocs("synthetic", [TokenizedPart(tokens, targets, offsets)])


def eval_rows(n: int, seed: int) -> PackedRows:
    source = docs(n, seed=seed)
    packed = list(RowPacker(seq_len=16, pad_id=0).rows(iter([(0, 0, source.fetch(range(n)))])))
    return PackedRows(*(np.stack([getattr(r, k) for r in packed]) for k in ("input_ids", "labels", "position_ids")))


def train_batches(n: int, *, micro: int = 2) -> PackedBatches:
    view = RankView([docs(n)], Mixture([n], [1.0], seed=1))
    return PackedBatches(view, seq_len=16, pad_id=0, micro_batch_size=micro)


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                   moe=MoEConfig(num_experts=2, top_k=1, expert_intermediate_size=16)))  # fmt: skip


def make_trainer(
    run_dir: Path,
    *,
    total_steps: int,
    eval_every: int = 1000,
    patience: int | None = None,
    save_every: int = 10**6,
    save_total_limit: int = 5,
    guard: GuardConfig | None = None,
    faults: str = "",
    lr: float = 1e-2,
    resume_from: Path | None = None,
    data: int = 60,
    callbacks: list[Callback] | None = None,
    engine: FakeEngine | None = None,
) -> Trainer:
    """A trainer of the tiny MoE on synthetic data with the fake engine (or `engine`), its checkpoints in
    run_dir/checkpoints; with `guard`, the divergence guard; with `resume_from`, the tag it resumes from (loaded by
    `resume`)."""
    run_dir.mkdir(parents=True, exist_ok=True)  # the session creates it before anything is saved
    module = TrainModule(engine or FakeEngine(tiny_model(), lr=lr),
                         guard=DivergenceGuard(guard, vocab_size=64) if guard is not None else None,
                         faults=FaultPlan(parse_faults(faults), rank=0))  # fmt: skip
    checkpoint = CheckpointConfig(save_every_n_steps=save_every, save_total_limit=save_total_limit)
    checkpoints = CheckpointManager(run_dir, checkpoint, INFO, loader=PlainLoader(INFO), resume_from=resume_from)
    return Trainer(module=module, batches=train_batches(data), eval_data=PackedDataset(eval_rows(12, seed=3)),
                   info=INFO, total_steps=total_steps,
                   train=TrainConfig(eval_every_n_steps=eval_every, early_stopping_patience=patience),
                   logging=LoggingConfig(log_every_n_steps=1), checkpoints=checkpoints, callbacks=callbacks or [],
                   config_record={})  # fmt: skip


def resume(trainer: Trainer) -> None:
    """What a session does after building the trainer: load the chosen tag into the engine and the trainer."""
    resumed = trainer.checkpoints.resume(trainer.module.engine)
    if resumed is not None:
        trainer.restore(resumed)
        trainer.checkpoints.set_aside_newer(resumed.tag_dir, log=print)


class Recorder(Callback):
    """The log records and evaluations a run produced, as metrics.jsonl would hold them."""

    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []

    def on_log(self, metrics: dict[str, Any]) -> None:
        self.logs.append(dict(metrics))

    def on_eval(self, metrics: dict[str, Any]) -> None:
        self.evals.append(dict(metrics))

    def losses(self) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in self.logs]
