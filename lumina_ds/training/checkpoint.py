"""Checkpoints as a contract: written under a staging name and renamed into place once `complete.json` lists every
file with its size and checksum; verified before loading, falling back to the previous verified tag; loaded without
unpickling anything but tensors; rotated without losing the newest or the best.

A run has one CheckpointManager. The tag it resumes from is chosen and verified before the engine is built
(`choose_resume_tag`), and the manager is built with the loader that tag needs: DeepSpeed's own (PlainLoader), or a
universal checkpoint when the world or expert-parallel size changed (training/elastic.py)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from lumina_ds.config.run import CheckpointConfig
from lumina_ds.distributed.collectives import any_rank, broadcast_token
from lumina_ds.distributed.consolidate import write_consolidated
from lumina_ds.distributed.env import DistInfo, barrier
from lumina_ds.errors import CheckpointError
from lumina_ds.run_dir import (
    CHECKPOINTS_DIR,
    COMPLETE_MARKER,
    TAG_PATTERN,
    fsync_path,
    has_weights,
    is_weights_only,
    list_complete_tags,
    resolve_checkpoint,
    tag_for_step,
)
from lumina_ds.tokenizer import ChatTokenizer
from lumina_ds.training.backup import backup_copier
from lumina_ds.training.checkpoint_files import (
    WEIGHTS_STAGING,
    build_manifest,
    check_files,
    corrupt_checkpoint,
    hashed_while_written,
    install_weights,
    weights_only_loads,
    write_marker,
)
from lumina_ds.training.checkpoint_state import Resumed, read_json, read_resumed, save_rank_state, save_trainer_state
from lumina_ds.training.engine import Engine
from lumina_ds.training.nvme_resume import restore_swapped_optimizer

STAGING = ".saving-"  # `.<tag>.saving-<token>`: a save in progress (or killed)
REPLACED = ".replaced-"  # `.<tag>.replaced-<token>`: a complete tag being replaced by a newer save of the same step
ABANDONED = "abandoned"  # checkpoints/abandoned/<time>/<tag>: newer tags of a continuation a resume abandoned
Log = Callable[[str], None]


class TagLoader(Protocol):
    """Loads a verified tag into an engine and returns our state of it."""

    universal: bool  # the engine must be built to load a universal checkpoint (DeepSpeed reads it at initialize)

    def load(self, engine: Engine, tag_dir: Path) -> Resumed: ...


class PlainLoader:
    """DeepSpeed's own checkpoint, saved by as many processes as this run has."""

    universal = False

    def __init__(self, info: DistInfo) -> None:
        self.info = info

    def load(self, engine: Engine, tag_dir: Path) -> Resumed:
        saved_world = read_json(tag_dir / COMPLETE_MARKER).get("world_size")
        if saved_world != self.info.world_size:
            raise CheckpointError(
                "E303",
                f"checkpoint {tag_dir.name} was saved by {saved_world} processes, this run has {self.info.world_size}",
                "resume with the same number of GPUs/processes as the run that saved it",
            )
        try:
            with weights_only_loads():
                path, _ = engine.load_checkpoint(str(tag_dir.parent), tag_dir.name)
        except Exception as exc:  # torch.load raises anything from UnpicklingError to EOFError on bad files
            raise corrupt_checkpoint(tag_dir, exc) from exc
        if path is None:
            raise CheckpointError("E303", f"DeepSpeed could not load checkpoint {tag_dir}")
        with weights_only_loads():
            restore_swapped_optimizer(engine, tag_dir)  # DeepSpeed skips it when the optimizer swaps to NVMe
        return read_resumed(tag_dir, rank=self.info.rank)


def is_disk_full(exc: BaseException) -> bool:
    """A write that failed for want of space (or permission): torch.save on a full disk raises RuntimeError ("enforce
    fail ... file write failed"), safetensors its SafetensorError ("No space left on device"), not OSError."""
    text = str(exc).lower()
    return isinstance(exc, OSError) or any(sign in text for sign in ("no space", "file write failed", "enforce fail",
                                                                     "disk quota"))  # fmt: skip


# ---- choosing the tag to resume from ----------------------------------------------------------------------------
def resumable_tags(checkpoints: Path) -> list[str]:
    """Complete tags with a training state (not import-hf's weights-only ones), oldest first."""
    return [t for t in list_complete_tags(checkpoints) if not is_weights_only(checkpoints / t)]


def resume_candidates(run_dir: Path, config: CheckpointConfig) -> list[Path]:
    """Tags to resume from, newest first: --resume's (and the older ones beside it), or with --auto-resume this
    run's own; empty for a fresh start."""
    own = run_dir / CHECKPOINTS_DIR
    if config.resume:
        checkpoints, tag = resolve_checkpoint(config.resume)
    elif config.auto_resume and resumable_tags(own):
        checkpoints, tag = own, resumable_tags(own)[-1]
    else:
        return []
    tags = resumable_tags(checkpoints)
    if tag not in tags:
        raise CheckpointError(
            "E303",
            f"{checkpoints / tag} holds weights only (written by import-hf): there is no training state to resume",
            f"start from it with --init-from {checkpoints / tag}",
        )
    return [checkpoints / t for t in reversed(tags[: tags.index(tag) + 1])]


def first_verified(tags: list[Path], info: DistInfo, *, strict: bool, log: Log) -> Path | None:
    """The first tag whose files match its manifest (collective: every rank checks a share and gets the same answer);
    a failing one is named and skipped, or E303 with `strict`."""
    for tag_dir in tags:
        problem = _verify(tag_dir, info)
        if problem is None:
            return tag_dir
        if strict:
            hint = "resume from an earlier tag, or drop --strict-resume to fall back to it"
            raise CheckpointError("E303", f"checkpoint {tag_dir} fails verification: {problem}", hint)
        log(f"warning: checkpoint {tag_dir.name} fails verification ({problem}): trying the previous one")
    return None


def _verify(tag_dir: Path, info: DistInfo) -> str | None:
    try:
        manifest = read_json(tag_dir / COMPLETE_MARKER)["files"]
    except (CheckpointError, KeyError) as exc:
        return f"{COMPLETE_MARKER} is unreadable ({exc})"
    return check_files(tag_dir, manifest, rank=info.rank, world_size=info.world_size)


def choose_resume_tag(run_dir: Path, config: CheckpointConfig, info: DistInfo, *, log: Log) -> Path | None:
    """The newest candidate that verifies, after rank 0 has finished or undone a save a kill interrupted; None for a
    fresh start; E303 when there are candidates and none verifies. Every rank calls it, before the engine exists."""
    if info.is_main:
        recover_interrupted_saves(run_dir / CHECKPOINTS_DIR)
    barrier()
    candidates = resume_candidates(run_dir, config)
    if not candidates:
        return None
    chosen = first_verified(candidates, info, strict=config.strict_resume, log=log)
    if chosen is None:
        raise CheckpointError("E303", "no checkpoint to resume from passes verification", "start afresh")
    return chosen


def recover_interrupted_saves(checkpoints: Path) -> None:
    """After a kill: finish a half-done swap (the replaced tag comes back if its successor is missing) and remove
    staging dirs. Rank 0, before anything reads the tags; one run per run directory (the run lock)."""
    if not checkpoints.is_dir():
        return
    for path in sorted(checkpoints.iterdir()):
        if REPLACED in path.name:
            target = checkpoints / path.name[1:].split(REPLACED)[0]
            if target.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.replace(path, target)
        elif STAGING in path.name:
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_dir():  # consolidated weights a kill left on their way into a tag
            for staging in path.glob(f"{WEIGHTS_STAGING}*"):
                shutil.rmtree(staging, ignore_errors=True)


# ---- the manager -------------------------------------------------------------------------------------------------
class CheckpointManager:
    """Saves, rotates, backs up and loads the tags of one run; `resume_from` is the verified tag the run resumes
    from (None for a fresh start), and `loader` the loader it needs."""

    def __init__(
        self,
        run_dir: Path,
        config: CheckpointConfig,
        info: DistInfo,
        *,
        loader: TagLoader,
        resume_from: Path | None = None,
        tokenizer: ChatTokenizer | None = None,
        weights_later: bool = True,
    ) -> None:
        self.dir = run_dir / CHECKPOINTS_DIR
        self.tokenizer = tokenizer  # each tag keeps a copy of it and its identity (training/resume_checks.py)
        self.config = config
        self.info = info
        self.loader = loader
        self.resume_from = resume_from
        self.backups = backup_copier(config, run_dir) if info.is_main else None  # copies to --backup-dir, if given
        # `weights_later`: the run's tags can get consolidated weights after the run (training/tag_weights.py)
        self.weights_every_save = config.consolidate == "every" or (config.consolidate == "final" and not weights_later)
        self.last_save_at = time.monotonic()  # rank 0's clock decides --save-every-minutes
        self.last_save_seconds: float | None = None

    def due(self, step: int) -> bool:
        """Whether the cadence asks for a checkpoint after optimizer step `step`: every `save_every_n_steps`, or once
        `save_every_minutes` have passed on rank 0's clock (collective then: every rank gets rank 0's answer)."""
        if step % self.config.save_every_n_steps == 0:
            return True
        if self.config.save_every_minutes <= 0:
            return False
        waited = time.monotonic() - self.last_save_at
        return any_rank(self.info.is_main and waited >= self.config.save_every_minutes * 60)

    # ---- saving --------------------------------------------------------------------------------------------
    def save(self, engine: Engine, step: int, *, state: dict[str, Any], data: dict[str, Any],
             keep_step: int | None = None, final: bool = False) -> Path:  # fmt: skip
        """Every rank calls this; `state` is rank 0's JSON state (trainer, module, config). The tag appears under its
        name only once complete (never half-written). Consolidated weights go in when `final` (the run's natural end)
        and `consolidate` is final, or with `consolidate` every."""
        started = time.monotonic()
        tag = tag_for_step(step)
        self._check_free_space()
        staging = self.dir / f".{tag}{STAGING}{broadcast_token(self.info.rank)}"
        weights = self.weights_every_save or (final and self.config.consolidate == "final")
        try:
            self._write(engine, staging, state=state, data=data, step=step, weights=weights)
        except Exception as exc:  # any writer's own type: safetensors' SafetensorError, torch's RuntimeError, OSError
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
        self.last_save_at = time.monotonic()
        self.last_save_seconds = self.last_save_at - started
        return self.dir / tag

    def _write(self, engine: Engine, staging: Path, *, state: dict[str, Any], data: dict[str, Any],
               step: int, weights: bool) -> None:  # fmt: skip
        with hashed_while_written(engine) as written:
            engine.save_checkpoint(str(self.dir), staging.name, client_state={}, save_latest=False)
        save_rank_state(staging, rank=self.info.rank, world_size=self.info.world_size, data=data)
        if self.info.is_main:
            save_trainer_state(staging, **state, tokenizer=self.tokenizer)
        if weights:
            write_consolidated(engine.module, staging, max_shard_bytes=self.config.weights_shard_mb << 20)
        barrier()  # every rank's files are written before they are listed
        files = build_manifest(staging, rank=self.info.rank, world_size=self.info.world_size, written=written)
        if self.info.is_main:  # last: the tag is complete once complete.json exists
            write_marker(staging, {"step": step, "world_size": self.info.world_size, "time": time.time(),
                                   "files": files})  # fmt: skip

    def add_weights(self, engine: Engine, step: int, *, keep_step: int | None = None) -> None:
        """At the run's natural end with `consolidate` final, when the last tag (this step's) was saved without its
        consolidated weights: they are written into it, and a backup of it is copied again. Collective."""
        tag_dir = self.dir / tag_for_step(step)
        if self.config.consolidate != "final" or self.weights_every_save or not tag_dir.is_dir():
            return
        if has_weights(tag_dir):  # a resume of a finished run
            return
        staging = tag_dir / f"{WEIGHTS_STAGING}{broadcast_token(self.info.rank)}"
        write_consolidated(engine.module, staging, max_shard_bytes=self.config.weights_shard_mb << 20)
        if self.info.is_main:
            if self.backups is not None:
                self.backups.wait()  # its copy of the tag is finished before the tag changes
            install_weights(tag_dir, staging)
            if self.backups is not None:
                self.backups.refresh(tag_dir, best_step=keep_step)
        barrier()

    def _install(self, staging: Path, target: Path) -> None:
        """Rename the complete staging dir into place; a complete tag of the same step moves aside first, so a kill
        at any moment leaves one complete tag under the name (recovery undoes a half-finished swap)."""
        replaced = None
        if target.exists():
            replaced = target.with_name(f".{target.name}{REPLACED}{staging.name.rsplit('-', 1)[-1]}")
            os.replace(target, replaced)
        os.replace(staging, target)
        fsync_path(target.parent)
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
        newest = _step_of(complete[-1]) if complete else -1
        for path in self.dir.iterdir():
            match = TAG_PATTERN.match(path.name)
            if match and path.name not in keep and int(match.group(1)) < newest:
                shutil.rmtree(path, ignore_errors=True)

    def wait_for_backup(self) -> None:
        """At the end of the run (a signal stop too): the copy in progress finishes and is verified first."""
        if self.backups is not None:
            self.backups.wait()

    # ---- loading -------------------------------------------------------------------------------------------
    def resume(self, engine: Engine) -> Resumed | None:
        """Load the tag chosen before the engine was built (None for a fresh start). Once the run has restored it,
        `set_aside_newer` moves this run's newer tags aside."""
        if self.resume_from is None:
            return None
        return self.loader.load(engine, self.resume_from)

    def set_aside_newer(self, tag_dir: Path, *, log: Log) -> None:
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

    def load_newest(self, engine: Engine, *, log: Log) -> Resumed | None:
        """For a rewind: the newest of this run's tags that verifies, else the one it resumed from; None if none."""
        own = [self.dir / tag for tag in reversed(list_complete_tags(self.dir))]
        tags = own or ([self.resume_from] if self.resume_from is not None else [])
        chosen = first_verified(tags, self.info, strict=False, log=log)
        return self.loader.load(engine, chosen) if chosen is not None else None


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
