"""Checkpoints: DeepSpeed shards + our consolidated weights + per-rank RNG, a completion marker, rotation."""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lumina_ds.config.run import CheckpointConfig
from lumina_ds.distributed.consolidate import write_consolidated
from lumina_ds.distributed.env import DistInfo, barrier
from lumina_ds.errors import CheckpointError
from lumina_ds.run_dir import (
    CHECKPOINTS_DIR,
    COMPLETE_MARKER,
    TAG_PATTERN,
    list_complete_tags,
    resolve_checkpoint,
    tag_for_step,
)
from lumina_ds.training.train_step import Engine


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    def __init__(self, run_dir: Path, config: CheckpointConfig, info: DistInfo) -> None:
        self.dir = run_dir / CHECKPOINTS_DIR
        self.config = config
        self.info = info

    def due(self, step: int) -> bool:
        """Whether the cadence asks for a checkpoint after optimizer step `step`."""
        return step % self.config.save_every_n_batches == 0

    def save(self, engine: Engine, step: int, client_state: dict[str, Any]) -> Path:
        """Every rank calls this. The tag only counts once `complete.json` exists (written last, by rank 0)."""
        tag = tag_for_step(step)
        tag_dir = self.dir / tag
        try:
            engine.save_checkpoint(str(self.dir), tag, client_state=client_state)
            torch.save(rng_state(), tag_dir / f"rng_rank{self.info.rank}.pt")
            write_consolidated(engine.module, tag_dir, max_shard_bytes=self.config.weights_shard_mb << 20)
            if self.info.is_main:
                meta = {"step": step, "world_size": self.info.world_size, "time": time.time()}
                (tag_dir / COMPLETE_MARKER).write_text(json.dumps(meta))
        except OSError as exc:
            if self.info.is_main:
                shutil.rmtree(tag_dir, ignore_errors=True)  # never leave a half-written tag behind
            raise CheckpointError(
                "E303",
                f"saving checkpoint {tag_dir} failed: {exc}",
                "free disk space (earlier checkpoints are intact) or lower --save-total-limit",
            ) from exc
        barrier()  # every rank's shards are written before rank 0 may delete older tags
        if self.info.is_main:
            self.rotate()
        return tag_dir

    def rotate(self) -> None:
        """Keep the newest `save_total_limit` complete tags; drop older ones and interrupted saves before them."""
        complete = list_complete_tags(self.dir)
        keep = set(complete[-self.config.save_total_limit :])
        newest = int(TAG_PATTERN.match(complete[-1]).group(1)) if complete else -1  # type: ignore[union-attr]
        for path in self.dir.iterdir():
            match = TAG_PATTERN.match(path.name)
            if match and path.name not in keep and int(match.group(1)) < newest:
                shutil.rmtree(path, ignore_errors=True)

    def find_resume(self) -> tuple[Path, str] | None:
        if self.config.resume:
            return resolve_checkpoint(self.config.resume)
        if self.config.auto_resume and list_complete_tags(self.dir):
            return resolve_checkpoint(self.dir)
        return None

    def load(self, engine: Engine, checkpoints_dir: Path, tag: str) -> dict[str, Any]:
        meta = json.loads((checkpoints_dir / tag / COMPLETE_MARKER).read_text())
        if meta.get("world_size") != self.info.world_size:
            raise CheckpointError(
                "E303",
                f"checkpoint {tag} was saved by {meta.get('world_size')} processes, "
                f"this run has {self.info.world_size}",
                "resume with the same number of GPUs/processes as the run that saved it",
            )
        try:
            path, client_state = engine.load_checkpoint(str(checkpoints_dir), tag)
        except Exception as exc:  # torch.load raises anything from UnpicklingError to EOFError on bad files
            raise CheckpointError("E303", f"checkpoint {checkpoints_dir / tag} is corrupt: {exc}") from exc
        if path is None:
            raise CheckpointError("E303", f"DeepSpeed could not load checkpoint {checkpoints_dir / tag}")
        rng_file = checkpoints_dir / tag / f"rng_rank{self.info.rank}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return client_state or {}
