"""The training loop with a plain-torch stand-in for the DeepSpeed engine: fast, single process."""

from __future__ import annotations

import errno
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lumina_ds.training.train_step import TrainStep

from lumina_ds.batch import IGNORE_INDEX
from lumina_ds.config.run import CheckpointConfig, LoggingConfig, TrainConfig
from lumina_ds.data.loading.mixture import Mixture
from lumina_ds.data.loading.packing import PackedDataset, PackedRows
from lumina_ds.data.loading.stream import PackedBatches, RankView, RowPacker
from lumina_ds.data.prepare.documents import TokenizedDocs, TokenizedPart
from lumina_ds.distributed.env import DistInfo
from lumina_ds.errors import CheckpointError, MemoryPlanError, TrainingError
from lumina_ds.models.config import ModelConfig, MoEConfig
from lumina_ds.models.transformer import Transformer
from lumina_ds.training.checkpoint import CheckpointManager, Resumed
from lumina_ds.training.checkpoint_state import load_rank_state, load_trainer_state
from lumina_ds.training.trainer import Trainer

INFO = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))


class FakeEngine:
    """The slice of DeepSpeedEngine the loop uses, over a plain module and AdamW."""

    def __init__(self, model: torch.nn.Module, *, accum: int = 1, micro: int = 2) -> None:
        self.module = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
        self.device = torch.device("cpu")
        self.accum, self.micro, self.micro_steps, self.saved = accum, micro, 0, []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accum == 0:
            self.optimizer.step()
            self.optimizer.zero_grad()

    def gradient_accumulation_steps(self) -> int:
        return self.accum

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.micro

    def get_global_grad_norm(self) -> float:
        return 1.0

    def was_step_applied(self) -> bool:
        return True

    def get_lr(self) -> list[float]:
        return [1e-2]

    def eval(self) -> None:
        self.module.eval()

    def train(self) -> None:
        self.module.train()

    def save_checkpoint(self, directory: str, tag: str, client_state: dict[str, Any], save_latest: bool = True) -> None:
        (Path(directory) / tag).mkdir(parents=True, exist_ok=True)
        self.saved.append((tag, client_state))


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


def train_batches(n: int) -> PackedBatches:
    view = RankView([docs(n)], Mixture([n], [1.0], seed=1))
    return PackedBatches(view, seq_len=16, pad_id=0, micro_batch_size=2)


def make_trainer(tmp_path: Path, *, total_steps: int, eval_every: int = 1000,
                 patience: int | None = None) -> Trainer:  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                        moe=MoEConfig(num_experts=2, top_k=1, expert_intermediate_size=16)))  # fmt: skip
    batches = train_batches(60)
    train = TrainConfig(eval_every_n_steps=eval_every, early_stopping_patience=patience)
    checkpoints = CheckpointManager(tmp_path, CheckpointConfig(save_every_n_steps=10**6), INFO)
    return Trainer(step=TrainStep(FakeEngine(model)), batches=batches, eval_data=PackedDataset(eval_rows(12, seed=3)),
                   info=INFO, total_steps=total_steps, train=train, logging=LoggingConfig(log_every_n_steps=1),
                   checkpoints=checkpoints, callbacks=[], config_record={})  # fmt: skip


def test_evaluate_is_token_weighted_over_every_row(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, total_steps=1)
    data = trainer.eval_data
    assert data is not None
    total, targets = 0.0, 0
    with torch.no_grad():
        for i in range(len(data)):  # one row at a time, weighted by its number of targets
            batch = data.batch([i])
            out = trainer.engine.module(batch.input_ids, labels=batch.labels, position_ids=batch.position_ids)
            total += float(out["lm_loss"]) * int(out["num_targets"])
            targets += int(out["num_targets"])
    result = trainer.evaluate()
    assert result["eval_tokens"] == targets == data.rows.num_target_tokens
    assert math.isclose(result["eval_loss"], total / targets, rel_tol=1e-6)


def test_early_stopping_after_patience_evaluations_without_improvement(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, total_steps=50, eval_every=1, patience=2)
    losses = iter([3.0, 2.0, 2.5, 2.1, 1.0])
    trainer.evaluate = lambda: {"step": trainer.state.step, "eval_loss": next(losses), "eval_ppl": 1.0,  # type: ignore[method-assign]
                                "eval_tokens": 1}  # fmt: skip
    summary = trainer.fit()
    assert summary["stop_reason"] == "early stopping" and summary["steps"] == 4
    assert trainer.state.best_step == 2 and trainer.state.best_eval_loss == 2.0
    assert (tmp_path / "checkpoints" / "step_00000004" / "complete.json").is_file()  # the final checkpoint is written


def test_client_state_round_trip_continues_the_data(tmp_path: Path) -> None:
    first = make_trainer(tmp_path, total_steps=3)
    first.fit()
    tag = tmp_path / "checkpoints" / "step_00000003"
    own = load_rank_state(tag, rank=0)
    state = Resumed(tag, load_trainer_state(tag)["trainer"], own["data"], {})  # what the JSON files give back
    second = make_trainer(tmp_path, total_steps=5)
    second.restore(state)
    assert second.state.step == 3
    assert second.batches.state_dict() == first.batches.state_dict()


def test_full_disk_during_save_is_e303_and_keeps_earlier_checkpoints(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, total_steps=1)
    manager = trainer.checkpoints
    earlier = manager.dir / "step_00000001"
    earlier.mkdir(parents=True)
    (earlier / "complete.json").write_text("{}")

    def no_space(directory: str, tag: str, client_state: dict[str, Any], save_latest: bool) -> None:
        (Path(directory) / tag).mkdir(parents=True)
        (Path(directory) / tag / "partial.pt").write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    trainer.engine.save_checkpoint = no_space  # type: ignore[method-assign]
    trainer.state.step = 2
    with pytest.raises(CheckpointError) as err:
        trainer.save()
    assert err.value.code == "E303" and "No space left" in str(err.value)
    assert not (manager.dir / "step_00000002").exists()  # the half-written tag is gone
    assert (earlier / "complete.json").exists()  # the earlier checkpoint is untouched


def test_eval_batches_have_equal_shapes_on_every_rank_and_cover_each_row_once(tmp_path: Path) -> None:
    """Unequal shards would desynchronise ZeRO-3 gathers and the native MoE all-to-all (whose capacity follows the
    token count): every rank gets batches of the same shapes, padded with target-free rows."""
    seen: list[int] = []
    shapes: dict[int, list[tuple[int, ...]]] = {}
    for rank in (0, 1):
        trainer = make_trainer(tmp_path, total_steps=1)  # micro-batch 2
        trainer.eval_data = PackedDataset(eval_rows(10, seed=3))  # 7 packed rows: ranks get 4 and 3
        trainer.info = DistInfo(
            rank=rank, local_rank=rank, world_size=2, local_world_size=2, device=torch.device("cpu")
        )
        n = len(trainer.eval_data)
        assert n == 7
        batches = list(trainer._eval_batches())
        shapes[rank] = [tuple(b.input_ids.shape) for b in batches]
        for b in batches:
            for row_labels, row_ids in zip(b.labels, b.input_ids, strict=True):
                if (row_labels != IGNORE_INDEX).any():
                    match = [i for i in range(n) if torch.equal(trainer.eval_data.batch([i]).input_ids[0], row_ids)]
                    seen.extend(match[:1])
    assert shapes[0] == shapes[1]
    assert sorted(seen) == list(range(n))


def test_divergence_is_e301_and_nothing_diverged_is_saved(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, total_steps=10)
    with torch.no_grad():
        trainer.engine.module.embed.weight[:, 0] = float("nan")  # every forward now gives a NaN loss
    with pytest.raises(TrainingError) as err:
        trainer.fit()
    assert err.value.code == "E301" and "step 1" in str(err.value)
    assert trainer.engine.saved == []


def test_out_of_memory_in_a_step_is_e204_and_other_errors_pass_through(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, total_steps=1)
    engine = trainer.engine
    cpu_oom = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: 4 GB")
    for error in (cpu_oom, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")):
        engine.module.forward = lambda *a, error=error, **k: (_ for _ in ()).throw(error)  # type: ignore[method-assign]
        with pytest.raises(MemoryPlanError) as err:
            TrainStep(engine).run(iter(trainer.batches))
        assert err.value.code == "E204" and "2 rows x 16 tokens" in err.value.message
        assert "--micro-batch-size" in err.value.hint
    engine.module.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch"))  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="shape mismatch"):
        TrainStep(engine).run(iter(trainer.batches))
