"""Elastic resume decisions, before any engine exists: what is refused (E303, with the reason), what is said when the
continuation cannot be exact, and when the universal path is taken. The loads themselves: tests/integration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from lumina_ds.config.io import config_to_dict
from lumina_ds.config.presets import get_preset
from lumina_ds.config.run import RunConfig
from lumina_ds.distributed.env import DistInfo
from lumina_ds.errors import CheckpointError
from lumina_ds.training import elastic
from lumina_ds.training.checkpoint import PlainLoader
from lumina_ds.training.elastic import Layout, continuation_note, tag_loader_for


def _run(tmp_path: Path, **distributed: Any) -> RunConfig:
    run = get_preset("debug")
    run.logging.output_dir, run.logging.experiment_name = str(tmp_path / "runs"), "new"
    run.train.micro_batch_size, run.train.grad_accum = 4, 1
    for key, value in distributed.items():
        setattr(run.distributed, key, value)
    return run


def _saved_tag(tmp_path: Path, run: RunConfig, *, world_size: int) -> Path:
    """A tag as a run with `run`'s config on `world_size` processes leaves it (no DeepSpeed files needed here)."""
    tag = tmp_path / "old" / "checkpoints" / "step_00000004"
    (tag / "lumina_state").mkdir(parents=True)
    (tag / "complete.json").write_text(json.dumps({"step": 4, "world_size": world_size, "files": {}}))
    state = {"trainer": {"step": 4}, "module": {}, "config": config_to_dict(run)}
    (tag / "lumina_state" / "trainer.json").write_text(json.dumps(state))
    return tag


def _plan(run: RunConfig, tag: Path, world_size: int) -> tuple[Any, list[str]]:
    """The loader the (verified) tag needs on `world_size` processes, and what was said: None for DeepSpeed's own."""
    said: list[str] = []
    info = DistInfo(
        rank=0, local_rank=0, world_size=world_size, local_world_size=world_size, device=torch.device("cpu")
    )
    loader = tag_loader_for(tag, run, info, log=said.append)
    return (None if isinstance(loader, PlainLoader) else loader), said


def test_a_native_moe_checkpoint_on_other_sizes_is_refused_with_the_reason(tmp_path: Path) -> None:
    tag = _saved_tag(tmp_path, _run(tmp_path, moe_backend="native", zero_stage=2), world_size=1)
    with pytest.raises(CheckpointError) as err:
        _plan(_run(tmp_path, moe_backend="autoep", zero_stage=2, expert_parallel_size=2), tag, world_size=2)
    assert err.value.code == "E303"
    assert "native DeepSpeed MoE" in err.value.message and "cannot be converted" in err.value.message
    assert "1 process(es)" in err.value.hint  # how to resume it instead


def test_a_zero_stage_change_is_refused_naming_both_stages(tmp_path: Path) -> None:
    tag = _saved_tag(tmp_path, _run(tmp_path, zero_stage=2), world_size=2)
    for world_size in (2, 1):  # at the same size too: DeepSpeed cannot load ZeRO states across stages at all
        with pytest.raises(CheckpointError) as err:
            _plan(_run(tmp_path, zero_stage=3), tag, world_size=world_size)
        assert err.value.code == "E303" and "ZeRO stage 2, this run has 3" in err.value.message
        assert "--zero-stage 2" in err.value.hint


def test_zero_0_resumes_only_on_the_sizes_that_saved_it(tmp_path: Path) -> None:
    tag = _saved_tag(tmp_path, _run(tmp_path, zero_stage=0), world_size=2)
    with pytest.raises(CheckpointError) as err:
        _plan(_run(tmp_path, zero_stage=0), tag, world_size=1)
    assert err.value.code == "E303" and "ZeRO 1-3" in err.value.message
    assert _plan(_run(tmp_path, zero_stage=0), tag, world_size=2) == (None, [])  # same sizes: the plain path


def test_the_continuation_is_called_inexact_only_when_the_steps_change() -> None:
    saved = Layout(2, 2, 2, False, micro_batch_size=4, grad_accum=1)
    same_rows = Layout(1, 1, 2, False, micro_batch_size=4, grad_accum=2)
    assert continuation_note(saved, same_rows) is None  # 2 x 1 x 4 rows = 1 x 2 x 4 rows: the same micro-batches
    fewer = continuation_note(saved, Layout(1, 1, 2, False, micro_batch_size=4, grad_accum=1))
    assert fewer is not None and "not exact" in fewer and "from 8 rows" in fewer and "to 4 rows" in fewer
    assert "--grad-accum 2 keeps 8" in fewer
    regrouped = continuation_note(saved, Layout(2, 2, 2, False, micro_batch_size=2, grad_accum=2))
    assert regrouped is not None and "micro-batch changes from 4 to 2" in regrouped and "same 8 rows" in regrouped


def test_a_changed_global_batch_at_the_same_size_says_so_and_takes_the_plain_path(tmp_path: Path) -> None:
    tag = _saved_tag(tmp_path, _run(tmp_path, zero_stage=2), world_size=2)
    changed = _run(tmp_path, zero_stage=2)
    changed.train.grad_accum = 3
    plan, said = _plan(changed, tag, world_size=2)
    assert plan is None and len(said) == 1 and "not exact" in said[0] and "to 24 rows" in said[0]


def test_a_conversion_deepspeed_refuses_is_one_e303_on_every_rank(tmp_path: Path) -> None:
    """A tag whose DeepSpeed files are missing: the converter's own last line names what it could not read."""
    tag = _saved_tag(tmp_path, _run(tmp_path, zero_stage=2), world_size=2)
    with pytest.raises(CheckpointError) as err:
        _plan(_run(tmp_path, zero_stage=2), tag, world_size=1)
    assert err.value.code == "E303" and "could not convert" in err.value.message
    assert not list((tmp_path / "runs" / "new" / "checkpoints" / ".universal").glob("step_*"))  # nothing half-made


def test_a_checkpoint_swapped_to_nvme_is_refused_on_other_sizes(tmp_path: Path) -> None:
    """Its ZeRO files hold empty tensors for the swapped groups: a universal conversion would resume on zeros."""
    nvme = {"zero_stage": 3, "offload": "optimizer", "offload_device": "nvme", "nvme_path": str(tmp_path)}
    tag = _saved_tag(tmp_path, _run(tmp_path, **nvme), world_size=2)
    with pytest.raises(CheckpointError) as err:
        _plan(_run(tmp_path, **nvme), tag, world_size=1)
    assert err.value.code == "E303" and "swapped to NVMe" in err.value.message
    assert "--offload-device cpu" in err.value.hint
    assert _plan(_run(tmp_path, **nvme), tag, world_size=2) == (None, [])  # the same sizes: DeepSpeed's own load


def _sized(tag: Path, size: int) -> None:
    """The tag's complete.json lists files of `size` bytes in all (what the space check and the refusal read)."""
    marker = json.loads((tag / "complete.json").read_text())
    marker["files"] = {"zero_pp_rank_0_mp_rank_00_optim_states.pt": {"size": size, "xxh3": "0"}}
    (tag / "complete.json").write_text(json.dumps(marker))


def test_the_conversion_is_refused_before_anything_is_written_when_its_peak_does_not_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check counts SPACE_FACTOR x the tag (the temporary fragments included), not the tag alone."""
    tag = _saved_tag(tmp_path, _run(tmp_path, zero_stage=2), world_size=2)
    _sized(tag, 10 * 2**30)
    free = int(10 * 2**30 * (elastic.SPACE_FACTOR - 0.1))  # more than the tag, less than the peak
    monkeypatch.setattr(elastic.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(free, 0, free))
    with pytest.raises(CheckpointError) as err:
        _plan(_run(tmp_path, zero_stage=2), tag, world_size=1)
    assert err.value.code == "E303" and "temporary fragments included" in err.value.message
    assert f"{10 * elastic.SPACE_FACTOR:.2f} GB" in err.value.message
    assert not [p for p in (tmp_path / "runs" / "new" / "checkpoints" / ".universal").iterdir()]  # nothing written


def test_a_layout_the_split_does_not_cover_is_refused_above_the_size_with_the_time_it_would_take(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = _saved_tag(tmp_path, _run(tmp_path, zero_stage=2), world_size=2)
    _sized(tag, elastic.SINGLE_PROCESS_LIMIT + 2**30)
    monkeypatch.setattr(elastic.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(2**60, 0, 2**60))
    monkeypatch.setattr(elastic, "convert_share", lambda *a, **k: False)  # as for tensor or pipeline parallelism
    with pytest.raises(CheckpointError) as err:
        _plan(_run(tmp_path, zero_stage=2), tag, world_size=1)
    hours = (elastic.SINGLE_PROCESS_LIMIT + 2**30) / elastic.SINGLE_PROCESS_RATE / 3600
    assert err.value.code == "E303" and "DeepSpeed's converter in one process" in err.value.message
    assert f"about {hours:.1f} h while every other rank waits" in err.value.message
    assert not [p for p in (tmp_path / "runs" / "new" / "checkpoints" / ".universal").iterdir()]  # staging removed
