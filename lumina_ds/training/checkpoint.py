"""Checkpoints as a contract: written under a staging name and renamed into place once `complete.json` lists every
file with its size and checksum; verified before loading, falling back to the previous verified tag; loaded without
unpickling anything but tensors; rotated without losing the newest or the best."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lumina_ds.config.run import CheckpointConfig
from lumina_ds.distributed.collectives import any_rank, broadcast_token
from lumina_ds.distributed.consolidate import write_consolidated
from lumina_ds.distributed.env import DistInfo, barrier
from lumina_ds.errors import CheckpointError
from lumina_ds.run_dir import (
    CHECKPOINTS_DIR,
    COMPLETE_MARKER,
    TAG_PATTERN,
    is_weights_only,
    list_complete_tags,
    tag_for_step,
)
from lumina_ds.training.backup import backup_copier
from lumina_ds.training.checkpoint_files import build_manifest, check_files, raise_corrupt, weights_only_loads
from lumina_ds.training.checkpoint_state import (
    STATE_DIR,
    load_rank_state,
    load_trainer_state,
    save_rank_state,
    save_trainer_state,
    set_rng_state,
)
from lumina_ds.training.train_step import Engine

if TYPE_CHECKING:
    from lumina_ds.training.elastic import ElasticResume

STAGING = ".saving-"  # `.<tag>.saving-<token>`: a save in progress (or killed)
REPLACED = ".replaced-"  # `.<tag>.replaced-<token>`: a complete tag being replaced by a newer save of the same step
ABANDONED = "abandoned"  # checkpoints/abandoned/<time>/<tag>: newer tags of a continuation a resume abandoned


@dataclass
class Resumed:
    """What a checkpoint gives back to the run: the trainer's state, this rank's data position, the saved config."""

    tag_dir: Path
    trainer: dict[str, Any]
    data: dict[str, Any]
    config: dict[str, Any]


def is_disk_full(exc: BaseException) -> bool:
    """torch.save on a full disk raises RuntimeError ("enforce fail ... file write failed"), not OSError."""
    text = str(exc).lower()
    return isinstance(exc, OSError) or "no space" in text or "file write failed" in text or "enforce fail" in text


class CheckpointManager:
    def __init__(self, run_dir: Path, config: CheckpointConfig, info: DistInfo) -> None:
        self.dir = run_dir / CHECKPOINTS_DIR
        self.config = config
        self.info = info
        self.backups = backup_copier(config, run_dir) if info.is_main else None  # copies to --backup-dir, if given
        self.elastic: ElasticResume | None = None  # set when this run resumes a tag saved on other sizes

    def due(self, step: int) -> bool:
        """Whether the cadence asks for a checkpoint after optimizer step `step`."""
        return step % self.config.save_every_n_batches == 0

    # ---- saving ------------------------------------------------------------------------------------
    def save(self, engine: Engine, step: int, *, trainer: dict[str, Any], data: dict[str, Any],
             config: dict[str, Any], keep_step: int | None = None) -> Path:  # fmt: skip
        """Every rank calls this. The tag appears under its name only once complete (never half-written)."""
        tag = tag_for_step(step)
        self._check_free_space()
        staging = self.dir / f".{tag}{STAGING}{broadcast_token(self.info.rank)}"
        try:
            self._write(engine, staging, trainer=trainer, data=data, config=config, step=step)
        except (OSError, RuntimeError) as exc:
            if not is_disk_full(exc):
                raise
            if self.info.is_main:
                shutil.rmtree(staging, ignore_errors=True)  # earlier tags stay as they were
            raise CheckpointError(
                "E303",
                f"saving checkpoint {tag} failed: {str(exc).strip().splitlines()[0][:200]}",
                "free disk space (earlier checkpoints are intact) or lower --save-total-limit",
            ) from exc
        if self.info.is_main:
            self._install(staging, self.dir / tag)
            self.rotate(keep_step=keep_step)
            if self.backups is not None:
                self.backups.after_install(self.dir / tag, best_step=keep_step)
        barrier()
        return self.dir / tag

    def _write(self, engine: Engine, staging: Path, *, trainer: dict[str, Any], data: dict[str, Any],
               config: dict[str, Any], step: int) -> None:  # fmt: skip
        engine.save_checkpoint(str(self.dir), staging.name, client_state={}, save_latest=False)
        save_rank_state(staging, rank=self.info.rank, world_size=self.info.world_size, data=data)
        if self.info.is_main:
            save_trainer_state(staging, trainer=trainer, config=config)
        write_consolidated(engine.module, staging, max_shard_bytes=self.config.weights_shard_mb << 20)
        barrier()  # every rank's files are written before they are listed
        files = build_manifest(staging, rank=self.info.rank, world_size=self.info.world_size)
        if self.info.is_main:
            meta = {"step": step, "world_size": self.info.world_size, "time": time.time(), "files": files}
            with (staging / COMPLETE_MARKER).open("w") as handle:  # last: the tag is complete once this exists
                json.dump(meta, handle)
                handle.flush()
                os.fsync(handle.fileno())

    def _install(self, staging: Path, target: Path) -> None:
        """Rename the complete staging dir into place; a complete tag of the same step moves aside first, so a kill
        at any moment leaves one complete tag under the name (recover() undoes a half-finished swap)."""
        replaced = None
        if target.exists():
            replaced = target.with_name(f".{target.name}{REPLACED}{staging.name.rsplit('-', 1)[-1]}")
            os.replace(target, replaced)
        os.replace(staging, target)
        _fsync_dir(target.parent)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)

    def _check_free_space(self) -> None:
        """Refuse to start a save the disk cannot hold, judged by the last tag's size (E303, nothing written)."""
        tags = list_complete_tags(self.dir)
        need = _tag_bytes(self.dir / tags[-1]) if tags else 0
        free = shutil.disk_usage(self.dir if self.dir.exists() else self.dir.parent).free
        if any_rank(self.info.is_main and need > free):
            raise CheckpointError(
                "E303",
                f"not enough free space in {self.dir} for a checkpoint: the last one took {need / 2**30:.2f} GB, "
                f"{free / 2**30:.2f} GB are free",
                "free disk space or lower --save-total-limit (earlier checkpoints are intact)",
            )

    def rotate(self, *, keep_step: int | None = None) -> None:
        """Keep the newest `save_total_limit` complete tags and the best one; drop older tags and interrupted
        saves. Tags newer than the newest complete one (a save in progress elsewhere) are left alone."""
        complete = list_complete_tags(self.dir)
        keep = set(complete[-self.config.save_total_limit :])
        if keep_step is not None:
            keep.add(tag_for_step(keep_step))
        if self.backups is not None:
            keep |= self.backups.protected()  # its copy is not verified yet
        newest = int(TAG_PATTERN.match(complete[-1]).group(1)) if complete else -1  # type: ignore[union-attr]
        for path in self.dir.iterdir():
            match = TAG_PATTERN.match(path.name)
            if match and path.name not in keep and int(match.group(1)) < newest:
                shutil.rmtree(path, ignore_errors=True)

    def recover(self) -> None:
        """After a kill: finish a half-done swap (the replaced tag comes back if its successor is missing) and
        remove staging dirs. Rank 0, before anything reads the tags; one run per run directory (the run lock)."""
        if not self.dir.is_dir():
            return
        for path in sorted(self.dir.iterdir()):
            if REPLACED in path.name:
                target = self.dir / path.name[1:].split(REPLACED)[0]
                if target.exists():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.replace(path, target)
            elif STAGING in path.name:
                shutil.rmtree(path, ignore_errors=True)

    def wait_for_backup(self) -> None:
        """At the end of the run (a signal stop too): the copy in progress finishes and is verified first."""
        if self.backups is not None:
            self.backups.wait()

    # ---- loading -----------------------------------------------------------------------------------
    def candidates(self) -> list[Path]:
        """Tags to resume from, newest first: --resume's (and the older ones beside it), or this run's own."""
        from lumina_ds.run_dir import resolve_checkpoint

        if self.config.resume:
            checkpoints, tag = resolve_checkpoint(self.config.resume)
        elif self.config.auto_resume and self._resumable(self.dir):
            checkpoints, tag = self.dir, self._resumable(self.dir)[-1]
        else:
            return []
        tags = self._resumable(checkpoints)
        if tag not in tags:
            raise CheckpointError(
                "E303",
                f"{checkpoints / tag} holds weights only (written by import-hf): there is no training state to resume",
                f"start from it with --init-from {checkpoints / tag}",
            )
        return [checkpoints / t for t in reversed(tags[: tags.index(tag) + 1])]

    @staticmethod
    def _resumable(checkpoints: Path) -> list[str]:
        """Complete tags with a training state (not import-hf's weights-only ones), oldest first."""
        return [t for t in list_complete_tags(checkpoints) if not is_weights_only(checkpoints / t)]

    def load(self, engine: Engine, *, log: Any = print) -> Resumed | None:
        """The newest candidate that verifies; a failing one is named and skipped (E303 with strict_resume). An elastic
        resume's tag was chosen and verified before the engine was built (training/elastic.py)."""
        if self.elastic is not None:
            return self.elastic.load(engine)
        resumed = self._load_first_verified(engine, self.candidates(), log=log, strict=self.config.strict_resume)
        if resumed is None and (self.config.resume or (self.config.auto_resume and self._resumable(self.dir))):
            raise CheckpointError("E303", "no checkpoint to resume from passes verification", "start afresh")
        if resumed is not None:
            self._set_aside_newer(resumed.tag_dir, log=log)
        return resumed

    def _set_aside_newer(self, tag_dir: Path, *, log: Any) -> None:
        """Resuming a tag of this run older than its newest abandons the continuation the newer tags belong to: they
        move to checkpoints/abandoned/, so rotation and --auto-resume follow the new continuation (rotation by step
        number deleted the new tags, and --auto-resume went back to the abandoned ones)."""
        barrier()  # every rank has loaded before anything moves
        match = TAG_PATTERN.match(tag_dir.name)
        if not self.info.is_main or match is None or tag_dir.parent.resolve() != self.dir.resolve():
            return
        newer = [t for t in list_complete_tags(self.dir) if _step_of(t) > int(match.group(1))]
        if not newer:
            return
        aside = self.dir / ABANDONED / time.strftime("%Y%m%d-%H%M%S")
        aside.mkdir(parents=True, exist_ok=True)
        for tag in newer:
            os.replace(self.dir / tag, aside / tag)
        log(f"resumed from {tag_dir.name}, older than {', '.join(newer)}: those belong to an abandoned continuation "
            f"and were moved to {aside} (delete them when no longer needed)")  # fmt: skip

    def load_newest(self, engine: Engine, *, log: Any = print) -> Resumed | None:
        """For a rewind: the newest of this run's tags that verifies, else the one it resumed from; None if none."""
        own = [self.dir / tag for tag in reversed(list_complete_tags(self.dir))]
        return self._load_first_verified(engine, own or self.candidates(), log=log, strict=False)

    def _load_first_verified(self, engine: Engine, tags: list[Path], *, log: Any, strict: bool) -> Resumed | None:
        for tag_dir in tags:
            if self.elastic is not None and tag_dir == self.elastic.tag_dir:  # a rewind before this run's first save
                return self.elastic.load(engine)
            problem = self._verify(tag_dir)
            if problem is None:
                return self._load(engine, tag_dir)
            if strict:
                hint = "resume from an earlier tag, or drop --strict-resume to fall back to it"
                raise CheckpointError("E303", f"checkpoint {tag_dir} fails verification: {problem}", hint)
            log(f"warning: checkpoint {tag_dir.name} fails verification ({problem}): trying the previous one")
        return None

    def _verify(self, tag_dir: Path) -> str | None:
        meta = json.loads((tag_dir / COMPLETE_MARKER).read_text())
        if meta.get("world_size") != self.info.world_size:
            raise CheckpointError(
                "E303",
                f"checkpoint {tag_dir.name} was saved by {meta.get('world_size')} processes, this run has "
                f"{self.info.world_size}",
                "resume with the same number of GPUs/processes as the run that saved it",
            )
        if "files" not in meta:  # written before checkpoints carried a manifest
            return None
        return check_files(tag_dir, meta["files"], rank=self.info.rank, world_size=self.info.world_size)

    def _load(self, engine: Engine, tag_dir: Path) -> Resumed:
        try:
            with weights_only_loads():
                path, client_state = engine.load_checkpoint(str(tag_dir.parent), tag_dir.name)
        except Exception as exc:  # torch.load raises anything from UnpicklingError to EOFError on bad files
            raise raise_corrupt(tag_dir, exc) from exc
        if path is None:
            raise CheckpointError("E303", f"DeepSpeed could not load checkpoint {tag_dir}")
        if not (tag_dir / STATE_DIR).is_dir():  # an older tag: its state is in DeepSpeed's client_state
            state = client_state or {}
            return Resumed(tag_dir, state.get("trainer", {}), state.get("data", {}), state.get("config", {}))
        own = load_rank_state(tag_dir, rank=self.info.rank)
        set_rng_state(own["rng"])
        saved = load_trainer_state(tag_dir)
        return Resumed(tag_dir, saved["trainer"], own["data"], saved["config"])


def _step_of(tag: str) -> int:
    match = TAG_PATTERN.match(tag)
    assert match is not None, tag
    return int(match.group(1))


def _tag_bytes(tag_dir: Path) -> int:
    try:
        files = json.loads((tag_dir / COMPLETE_MARKER).read_text()).get("files", {})
    except (OSError, ValueError):
        return 0
    return int(sum(f["size"] for f in files.values()))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
