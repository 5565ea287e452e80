"""The training loop with a plain-torch stand-in for the DeepSpeed engine: fast, single process."""

from __future__ import annotations

import errno
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from lumina_ds.batch import IGNORE_INDEX
from lumina_ds.data.loading.packing import PackedDataset
from lumina_ds.distributed.env import DistInfo
from lumina_ds.errors import CheckpointError, MemoryPlanError, TrainingError
from lumina_ds.training.checkpoint_state import Resumed, load_rank_state, load_trainer_state
from lumina_ds.training.train_module import TrainModule
from tests.training.fakes import eval_rows, make_trainer


def test_evaluate_is_token_weighted_over_every_row(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, total_steps=1)
    data = trainer.eval_data
    assert data is not None
    total, targets = 0.0, 0
    with torch.no_grad():
        for i in range(len(data)):  # one row at a time, weighted by its number of targets
            batch = data.batch([i])
            out = trainer.module.engine.module(batch.input_ids, labels=batch.labels, position_ids=batch.position_ids)
            total += float(out["lm_loss"]) * int(out["num_targets"])
            targets += int(out["num_targets"])
    result = trainer.evaluate()
    assert result["eval_tokens"] == targets == int((data.rows.labels != IGNORE_INDEX).sum())
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
    saved = load_trainer_state(tag)
    state = Resumed(tag, saved["trainer"], saved["module"], own["data"], {})  # what the JSON files give back
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

    trainer.module.engine.save_checkpoint = no_space  # type: ignore[method-assign]
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
        trainer.module.engine.module.embed.weight[:, 0] = float("nan")  # every forward now gives a NaN loss
    with pytest.raises(TrainingError) as err:
        trainer.fit()
    assert err.value.code == "E301" and "step 1" in str(err.value)
    assert trainer.module.engine.saved == []


def test_out_of_memory_in_a_step_is_e204_and_other_errors_pass_through(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, total_steps=1)
    engine = trainer.module.engine
    cpu_oom = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: 4 GB")
    for error in (cpu_oom, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")):
        engine.module.forward = lambda *a, error=error, **k: (_ for _ in ()).throw(error)  # type: ignore[method-assign]
        with pytest.raises(MemoryPlanError) as err:
            TrainModule(engine).train_step(iter(trainer.batches), step=1, data_step=1)
        assert err.value.code == "E204" and "2 rows x 16 tokens" in err.value.message
        assert "--micro-batch-size" in err.value.hint
    engine.module.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch"))  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="shape mismatch"):
        TrainModule(engine).train_step(iter(trainer.batches), step=1, data_step=1)
