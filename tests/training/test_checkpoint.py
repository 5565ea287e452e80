"""The checkpoint contract without DeepSpeed: rotation keeps the newest and the best, a kill during a re-save of a
tag loses nothing, and JSON state round-trips the RNG streams (the run lock: test_run_lock.py)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lumina_ds.config.run import CheckpointConfig
from lumina_ds.distributed.env import DistInfo
from lumina_ds.run_dir import COMPLETE_MARKER, list_complete_tags, tag_for_step
from lumina_ds.training.checkpoint import CheckpointManager, PlainLoader, recover_interrupted_saves
from lumina_ds.training.checkpoint_files import build_manifest, check_files
from lumina_ds.training.checkpoint_state import rng_state, set_rng_state

INFO = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))


def make_tag(checkpoints: Path, step: int, *, complete: bool = True) -> Path:
    tag = checkpoints / tag_for_step(step)
    tag.mkdir(parents=True)
    (tag / "weights.bin").write_bytes(os.urandom(64))
    if complete:
        (tag / COMPLETE_MARKER).write_text(json.dumps({"step": step, "world_size": 1}))
    return tag


def test_rotation_keeps_the_newest_the_unfinished_and_the_best(tmp_path: Path) -> None:
    """A planted bug that deleted the newest tags passed the suite: no test saved more than five tags."""
    manager = CheckpointManager(tmp_path, CheckpointConfig(save_total_limit=2), INFO, loader=PlainLoader(INFO))
    for step in (1, 2, 3, 4):
        make_tag(manager.dir, step)
    make_tag(manager.dir, 5, complete=False)  # a save in progress, newer than every complete tag
    manager.rotate(keep_step=1)  # step 1 had the best evaluation
    assert sorted(p.name for p in manager.dir.iterdir()) == [tag_for_step(s) for s in (1, 3, 4, 5)]
    manager.rotate()
    assert list_complete_tags(manager.dir) == [tag_for_step(3), tag_for_step(4)]


def test_a_kill_during_a_re_save_of_a_tag_loses_nothing(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, CheckpointConfig(), INFO, loader=PlainLoader(INFO))
    old = make_tag(manager.dir, 4)
    content = (old / "weights.bin").read_bytes()
    # killed between the two renames of a re-save: the old tag moved aside, the new one still staged
    aside = manager.dir / f".{old.name}.replaced-abc"
    os.replace(old, aside)
    staged = manager.dir / f".{old.name}.saving-abc"
    staged.mkdir()
    (staged / "half.bin").write_bytes(b"x")
    recover_interrupted_saves(manager.dir)
    assert (old / "weights.bin").read_bytes() == content and list_complete_tags(manager.dir) == [old.name]
    assert sorted(p.name for p in manager.dir.iterdir()) == [old.name]
    # killed after the new tag was renamed in but before the old one was removed: the new one stays
    os.replace(old, aside)
    make_tag(manager.dir, 4)
    recover_interrupted_saves(manager.dir)
    assert not aside.exists() and list_complete_tags(manager.dir) == [old.name]


def test_manifest_names_a_changed_file_in_the_middle(tmp_path: Path) -> None:
    tag = make_tag(tmp_path, 1)
    (tag / "sub").mkdir()
    (tag / "sub" / "state.json").write_text("{}")
    manifest = build_manifest(tag, rank=0, world_size=1)
    assert set(manifest) == {"weights.bin", "sub/state.json"}
    assert check_files(tag, manifest, rank=0, world_size=1) is None
    data = bytearray((tag / "weights.bin").read_bytes())
    data[32] ^= 0xFF
    (tag / "weights.bin").write_bytes(bytes(data))
    assert check_files(tag, manifest, rank=0, world_size=1) == "weights.bin does not match its checksum"
    (tag / "sub" / "state.json").unlink()
    assert "sub/state.json is missing" in str(check_files(tag, manifest, rank=0, world_size=1))


def test_rng_streams_round_trip_through_json() -> None:
    state = json.loads(json.dumps(rng_state()))  # nothing but JSON values
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.random(), np.random.rand(), torch.rand(1)  # advance all three
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_a_full_disk_under_the_metrics_file_is_one_line_of_e304(tmp_path: Path) -> None:
    import errno

    from lumina_ds.errors import LuminaError
    from lumina_ds.monitor.callbacks import JsonlLogger

    logger = JsonlLogger(tmp_path / "metrics.jsonl")

    class FullDisk:
        def write(self, _text: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self) -> None: ...

    logger.file = FullDisk()  # type: ignore[assignment]
    with pytest.raises(LuminaError) as err:
        logger.on_log({"step": 1, "loss": 1.0})
    assert err.value.code == "E304" and "No space left on device" in err.value.message
