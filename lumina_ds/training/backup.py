"""Backups of checkpoint tags to a second place (`--backup-dir`, `--backup-every-n-hours`, `--backup-total-limit`).

Rank 0 copies a newly installed tag to `<backup dir>/<experiment>/<tag>` in a background thread while training goes
on: under a staging name, every file fsynced and checked against the tag's manifest (sizes and xxh3), then renamed
into place, like a save. The tag being copied is kept out of rotation until then. A failed backup (full or unwritable
disk, a copy that does not match) warns in one line and never stops training; its partial copy is removed. The
run's config.yaml and tokenizer.json (with a model's chat template files) are copied beside the tags before each tag,
so the backup dir resumes and chats as a run dir from its first tag on (each tag also holds its own tokenizer).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lumina_ds.config.run import CheckpointConfig
from lumina_ds.run_dir import (
    COMPLETE_MARKER,
    CONFIG_FILE,
    TOKENIZER_FILE,
    fsync_path,
    list_complete_tags,
    tag_for_step,
)
from lumina_ds.tokenizer import TEMPLATE_FILES
from lumina_ds.training.checkpoint_files import file_digest, file_problems

STAGING = ".backup-"  # `.<name>.backup-<token>` in the backup dir: a copy in progress (or killed)
SIDE_FILES = (CONFIG_FILE, TOKENIZER_FILE, *TEMPLATE_FILES)  # the template files where the run has them


class BackupError(Exception):
    """One line saying which file failed and why."""


def copy_file(src: Path, dst: Path) -> None:
    """Copy the bytes and fsync them: a backup is only trusted once it is on disk and verified."""
    shutil.copyfile(src, dst)
    fsync_path(dst)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _staging_name(name: str) -> str:
    return f".{name}{STAGING}{os.getpid()}-{os.urandom(4).hex()}"


def copy_tag(tag_dir: Path, root: Path) -> int:
    """Copy a complete tag to `root/<tag>` and verify the copy against its manifest; returns the bytes copied.
    Raises BackupError naming the file; nothing but the finished copy is left under `root`."""
    meta_text = (tag_dir / COMPLETE_MARKER).read_text()
    manifest: dict[str, dict[str, Any]] = json.loads(meta_text).get("files", {})
    if not manifest:
        raise BackupError(f"{COMPLETE_MARKER} lists no files to verify a copy against (a tag saved before manifests)")
    staging = root / _staging_name(tag_dir.name)
    try:
        current = "the backup directory"
        staging.mkdir(parents=True)
        for name in sorted(manifest):
            current = name
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            copy_file(tag_dir / name, staging / name)
        problems = file_problems(staging, manifest)
        if problems:
            raise BackupError(f"the copy does not match the checkpoint's manifest: {'; '.join(problems)}")
        current = COMPLETE_MARKER
        copy_file(tag_dir / COMPLETE_MARKER, staging / COMPLETE_MARKER)  # last: the copy is complete once it exists
        if (staging / COMPLETE_MARKER).read_text() != meta_text:
            raise BackupError(f"the copy of {COMPLETE_MARKER} differs from the checkpoint's")
        fsync_path(staging)
        _swap_into_place(staging, root / tag_dir.name)
    except OSError as exc:
        raise BackupError(f"{current}: {_describe(exc)}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after the rename; a partial copy otherwise
    return sum(int(entry["size"]) for entry in manifest.values())


def _swap_into_place(staging: Path, target: Path) -> None:
    """Rename the verified copy into place; a backup of the same tag (an earlier lineage) moves aside first."""
    aside = None
    if target.exists():
        aside = target.with_name(_staging_name(target.name))
        os.replace(target, aside)
    os.replace(staging, target)
    fsync_path(target.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def copy_side_files(run_dir: Path, root: Path) -> None:
    """config.yaml and tokenizer.json beside the tags (what resume and chat read from a run dir), checked by digest."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackupError(f"the backup directory: {_describe(exc)}") from exc
    for name in SIDE_FILES:
        if not (run_dir / name).is_file():
            continue
        staged = root / _staging_name(name)
        try:
            copy_file(run_dir / name, staged)
            if file_digest(staged) != file_digest(run_dir / name):
                raise BackupError(f"the copy of {name} does not match the run's")
            os.replace(staged, root / name)
        except OSError as exc:
            raise BackupError(f"{name}: {_describe(exc)}") from exc
        finally:
            staged.unlink(missing_ok=True)


def saved_at(tag_dir: Path) -> float:
    """When the tag was saved (its manifest's time; the marker's mtime for older tags)."""
    try:
        return float(json.loads((tag_dir / COMPLETE_MARKER).read_text())["time"])
    except (OSError, ValueError, KeyError, TypeError):
        return (tag_dir / COMPLETE_MARKER).stat().st_mtime


def rotate_backups(root: Path, *, keep: int, best_step: int | None) -> list[str]:
    """Keep the `keep` most recently saved backups (by save time, so a run resumed from an older tag keeps its new
    lineage) and the best evaluation's; returns the names removed."""
    tags = sorted(list_complete_tags(root), key=lambda name: saved_at(root / name))
    kept = set(tags[-keep:])
    if best_step is not None:
        kept.add(tag_for_step(best_step))
    removed = [name for name in tags if name not in kept]
    for name in removed:
        shutil.rmtree(root / name, ignore_errors=True)
    return removed


def remove_stale_staging(root: Path) -> None:
    """Copies a killed run left behind (one run per experiment: no other copy is in progress)."""
    if root.is_dir():
        for path in root.iterdir():
            if STAGING not in path.name:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def last_backup_time(root: Path) -> float | None:
    """Wall-clock time of the newest backup already in `root` (a restarted run keeps the cadence), or None."""
    times = [(root / name / COMPLETE_MARKER).stat().st_mtime for name in list_complete_tags(root)]
    return max(times) if times else None


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class BackupCopier:
    """Rank 0's backups: one background copy at a time, started after a tag is installed when the cadence is due."""

    def __init__(self, *, root: Path, run_dir: Path, every_hours: float, keep: int,
                 log: Callable[[str], None] = print, warn: Callable[[str], None] = _warn) -> None:  # fmt: skip
        self.root, self.run_dir = root, run_dir
        self.every_s, self.keep = every_hours * 3600.0, keep
        self.log, self.warn = log, warn
        self.copying: str | None = None  # the tag being copied: rotation leaves it alone
        self._thread: threading.Thread | None = None
        try:
            self._last = last_backup_time(root)
        except OSError:
            self._last = None  # unreadable now: the first backup says why

    def due(self, now: float) -> bool:
        return self._last is None or now - self._last >= self.every_s

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def protected(self) -> set[str]:
        copying = self.copying
        return {copying} if copying else set()

    def after_install(self, tag_dir: Path, *, best_step: int | None) -> None:
        """Start copying the newly installed `tag_dir` if a backup is due (rank 0, main thread)."""
        if not self.due(time.time()):
            return
        if self.busy():
            self.log(f"backup: {tag_dir.name} is not copied, the copy of {self.copying} is still running")
            return
        self.copying = tag_dir.name
        self._thread = threading.Thread(target=self._run, args=(tag_dir, best_step), name="lumina-ds-backup")
        self._thread.start()

    def refresh(self, tag_dir: Path, *, best_step: int | None) -> None:
        """Copy `tag_dir` again if it was backed up before it changed (consolidated weights added at the run's end),
        whatever the cadence: the backup's manifest must be the tag's (rank 0, main thread, no copy running)."""
        if (self.root / tag_dir.name).is_dir():
            self.copying = tag_dir.name
            self._thread = threading.Thread(target=self._run, args=(tag_dir, best_step), name="lumina-ds-backup")
            self._thread.start()

    def wait(self) -> None:
        """Block until the copy in progress is finished and verified (end of run, signal stop)."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self.log(f"waiting for the backup of {self.copying} to {self.root} to finish")
            thread.join()

    def _run(self, tag_dir: Path, best_step: int | None) -> None:
        start = time.time()
        try:
            remove_stale_staging(self.root)
            copy_side_files(self.run_dir, self.root)  # first: a backup tag is usable (resume, chat) once it lands
            size = copy_tag(tag_dir, self.root)
            self._last = start
            removed = rotate_backups(self.root, keep=self.keep, best_step=best_step)
            dropped = f"; removed older backup(s) {', '.join(removed)}" if removed else ""
            self.log(f"backup: {tag_dir.name} -> {self.root / tag_dir.name} verified "
                     f"({size / 2**20:,.1f} MiB in {time.time() - start:.1f} s){dropped}")  # fmt: skip
        except BackupError as exc:
            self._failed(tag_dir, str(exc))
        except Exception as exc:  # a backup never stops training: anything unexpected is a warning too
            self._failed(tag_dir, f"{type(exc).__name__}: {_describe(exc)}")
        finally:
            self.copying = None

    def _failed(self, tag_dir: Path, reason: str) -> None:
        self.warn(f"backup of {tag_dir.name} to {self.root} failed ({reason}); the run's own checkpoint is intact "
                  "and training goes on")  # fmt: skip


def backup_copier(config: CheckpointConfig, run_dir: Path) -> BackupCopier | None:
    """Rank 0's copier for `<backup dir>/<experiment name>` (the run dir's name), or None without --backup-dir."""
    if not config.backup_dir:
        return None
    root = Path(config.backup_dir).expanduser() / run_dir.name
    return BackupCopier(root=root, run_dir=run_dir, every_hours=config.backup_every_n_hours,
                        keep=config.backup_total_limit)  # fmt: skip
