"""Where things live in a run directory `<output-dir>/<experiment-name>/`.

config.yaml              the resolved RunConfig
ds_config.json           the DeepSpeed JSON the engine was initialised with (derived from config.yaml)
tokenizer.json           the tokenizer the run trained with
metrics.jsonl            one JSON object per logged step
tensorboard/             TensorBoard event files
checkpoints/latest       name of the newest complete tag (written by DeepSpeed)
checkpoints/<tag>/       DeepSpeed shards + model.safetensors or model-*-of-*.safetensors with their index
                         (consolidated weights in the module dtype, our parameter names); a tag written by
                         `import-hf` holds the weights only (its complete.json says "weights_only": true)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from lumina_ds.errors import CheckpointError

CONFIG_FILE = "config.yaml"
DS_CONFIG_FILE = "ds_config.json"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
WEIGHTS_FILE = "model.safetensors"  # the consolidated weights when they fit one shard
INDEX_FILE = "model.safetensors.index.json"  # else model-0000i-of-0000n.safetensors and this index (HF layout)
COMPLETE_MARKER = "complete.json"  # written last: a tag without it was interrupted mid-save
TAG_PATTERN = re.compile(r"^step_(\d+)$")


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def list_complete_tags(checkpoints_dir: Path) -> list[str]:
    """Complete tags, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    tags = [p.name for p in checkpoints_dir.iterdir() if TAG_PATTERN.match(p.name) and (p / COMPLETE_MARKER).exists()]
    return sorted(tags, key=lambda t: int(TAG_PATTERN.match(t).group(1)))  # type: ignore[union-attr]


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """A run dir, a checkpoints dir or a tag dir -> (checkpoints dir, newest complete tag)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            "E303", f"checkpoint path {path} does not exist", "pass a run dir, its checkpoints/ or a tag"
        )
    if (path / COMPLETE_MARKER).exists() and TAG_PATTERN.match(path.name):
        if not marker_readable(path):
            raise CheckpointError("E303", f"checkpoint {path} has an unreadable {COMPLETE_MARKER} (its manifest)",
                                  "use an earlier tag in the same checkpoints/ directory")  # fmt: skip
        return path.parent, path.name
    if TAG_PATTERN.match(path.name):
        raise CheckpointError(
            "E303",
            f"checkpoint {path} is incomplete (no {COMPLETE_MARKER}: the save was interrupted)",
            "resume from an earlier tag in the same checkpoints/ directory",
        )
    checkpoints = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    tags = list_complete_tags(checkpoints)
    while tags and not marker_readable(checkpoints / tags[-1]):
        print(f"warning: {checkpoints / tags[-1] / COMPLETE_MARKER} is unreadable: using the previous tag",
              file=sys.stderr)  # fmt: skip
        tags.pop()
    if not tags:
        raise CheckpointError("E303", f"no complete checkpoint under {path}", "train with --save-every-n-steps first")
    return checkpoints, tags[-1]


def marker_readable(tag_dir: Path) -> bool:
    """Whether a tag's complete.json holds its manifest (a JSON object), as a save writes it."""
    try:
        return isinstance(json.loads((tag_dir / COMPLETE_MARKER).read_text()), dict)
    except (OSError, ValueError):
        return False


def fsync_path(path: Path) -> None:
    """Flush a file's bytes, or a directory's entries (a rename into it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_dir_of(checkpoints_dir: Path) -> Path:
    return checkpoints_dir.parent if checkpoints_dir.name == CHECKPOINTS_DIR else checkpoints_dir


def write_weights(state: dict[str, torch.Tensor], target: Path) -> Path:
    """Safetensors via a temp file and a rename, so a reader never sees half a file."""
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, target)
    return target


def write_shards(named: Iterable[tuple[str, torch.Tensor]], directory: Path, *, max_shard_bytes: int) -> list[Path]:
    """Write `named` tensors, in order, into `directory` as safetensors of at most `max_shard_bytes` each (a larger
    tensor gets a shard of its own): model.safetensors for one shard, else model-0000i-of-0000n.safetensors and Hugging
    Face's model.safetensors.index.json. Holds one shard in memory at a time; files appear under their names only once
    written. Returns the files written (the index last)."""
    shards: list[tuple[Path, list[str], int]] = []  # temp file, its tensor names, their bytes
    pending: dict[str, torch.Tensor] = {}
    for name, tensor in named:
        if pending and sum(t.nbytes for t in pending.values()) + tensor.nbytes > max_shard_bytes:
            shards.append(_write_shard(pending, directory, len(shards)))
            pending = {}
        pending[name] = tensor.detach().cpu().contiguous()
    if pending:
        shards.append(_write_shard(pending, directory, len(shards)))
    return _name_shards(shards, directory) if shards else []


def _write_shard(tensors: dict[str, torch.Tensor], directory: Path, index: int) -> tuple[Path, list[str], int]:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".shard-{index:05d}.safetensors.tmp"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, list(tensors), sum(t.nbytes for t in tensors.values())


def _name_shards(shards: list[tuple[Path, list[str], int]], directory: Path) -> list[Path]:
    if len(shards) == 1:
        os.replace(shards[0][0], directory / WEIGHTS_FILE)
        return [directory / WEIGHTS_FILE]
    final, weight_map = [], {}
    for i, (tmp, names, _) in enumerate(shards, start=1):
        target = directory / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.replace(tmp, target)
        weight_map.update(dict.fromkeys(names, target.name))
        final.append(target)
    index = {"metadata": {"total_size": sum(n for _, _, n in shards)}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [*final, directory / INDEX_FILE]


def is_weights_only(tag_dir: Path) -> bool:
    """A tag with weights but no training state (written by `import-hf`): for --init-from, chat and export only."""
    try:
        return bool(json.loads((tag_dir / COMPLETE_MARKER).read_text()).get("weights_only", False))
    except (OSError, ValueError, AttributeError):
        return False


def weights_files(tag_dir: Path) -> list[Path]:
    """The consolidated weights of a tag (or of a Hugging Face model directory): model.safetensors, or the shards its
    index names; E303 naming what is missing."""
    index = tag_dir / INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError("E303", f"{index} is not a weights index: {exc}", "load an earlier tag") from exc
        files = [tag_dir / name for name in names]
        hint = f"{index} names them; copy the missing shards or load an earlier tag"
    else:
        files = [tag_dir / WEIGHTS_FILE]
        hint = "a lumina-ds tag or a Hugging Face model directory holds model.safetensors (or shards and their index)"
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise CheckpointError("E303", f"consolidated weights not found: {', '.join(absent[:4])}", hint)
    return files


def has_weights(tag_dir: Path) -> bool:
    """Whether the tag holds consolidated weights (all of them: an index's shards too)."""
    with contextlib.suppress(CheckpointError):
        return bool(weights_files(tag_dir))
    return False


class SafetensorsFiles:
    """The tensors of one or more safetensors files by name, each read when asked for (nothing up front)."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self._where: dict[str, Path] = {}
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as handle:
                    self._where.update(dict.fromkeys(handle.keys(), path))
            except Exception as exc:  # safetensors raises its own (unexported) types for a bad header
                raise CheckpointError("E303", f"cannot read {path}: {exc}", "the file is corrupt or truncated") from exc

    def names(self) -> list[str]:
        return list(self._where)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the files' headers (no tensor is read)."""
        from safetensors import safe_open

        shapes: dict[str, tuple[int, ...]] = {}
        for path in dict.fromkeys(self._where.values()):
            with safe_open(str(path), framework="pt") as handle:
                names = handle.keys()
                shapes.update({name: tuple(handle.get_slice(name).get_shape()) for name in names})
        return shapes

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self._where[name]
        try:
            with safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(name)
        except Exception as exc:  # a file truncated or changed after its header was read
            raise CheckpointError("E303", f"cannot read {name} from {path}: {exc}", "the file is corrupt") from exc


LOCK_FILE = ".run.lock"
LOCK_HEARTBEAT_S = 30.0  # how often the holder rewrites the lock's heartbeat
LOCK_LEASE_S = 300.0  # a heartbeat older than this (10 missed beats) marks the lock stale, whoever holds it
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}  # os.link on some FUSE/SMB mounts
_HELD_TOKENS: set[str] = set()  # the locks this process holds: its own pid in a lock is stale unless listed here


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _write_bytes(path: Path, data: bytes) -> None:
    """A new file holding `data`, on the disk before it is linked or renamed anywhere."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _write_temp(directory: Path, data: bytes) -> Path:
    tmp = directory / f"{LOCK_FILE}.{uuid.uuid4().hex}.tmp"
    try:
        _write_bytes(tmp, data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _link(source: Path, target: Path, data: bytes) -> bool:
    """Create `target` with `source`'s content `data` unless it exists: an atomic create-with-content."""
    try:
        os.link(source, target)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        return _create_exclusive(target, data)
    return True


def _create_exclusive(target: Path, data: bytes) -> bool:
    """Without hard links: exclusive create, then write; a failed write removes the file. The lock is empty for a
    moment, and a starter reading it then may take it over: a race these filesystems leave open."""
    try:
        fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return True


def _publish(path: Path, data: bytes) -> bool:
    """Create the lock holding `data` if there is none; it is never seen empty or half written."""
    tmp = _write_temp(path.parent, data)
    try:
        return _link(tmp, path, data)
    finally:
        tmp.unlink(missing_ok=True)


def _parse(data: bytes | None) -> dict[str, Any] | None:
    """A lock's holder, or None when the bytes are no lock (empty, cut short, not ours)."""
    try:
        holder = json.loads(data or b"")
    except ValueError:
        return None
    pid = holder.get("pid") if isinstance(holder, dict) else None
    if not isinstance(holder, dict) or not isinstance(holder.get("host"), str) or type(pid) is not int:
        return None
    return holder


def _identity(data: bytes) -> object:
    """Which run a lock names, whatever its heartbeat says."""
    holder = _parse(data)
    return data if holder is None else tuple(holder.get(k) for k in ("host", "pid", "token", "started"))


def _heartbeat_age(holder: dict[str, Any], now: float) -> float | None:
    """Seconds since the holder's last heartbeat; None for a lock written before locks had one."""
    beat = holder.get("heartbeat")
    return now - float(beat) if isinstance(beat, int | float) and not isinstance(beat, bool) else None


def launcher_job() -> str | None:
    """The launcher's name for this job, the same in each of its relaunches: SLURM's job id (kept when the job is
    requeued), else the run id the launcher was given (LUMINA_RUN_ID, or torchrun's --rdzv-id: TORCHELASTIC_RUN_ID,
    "none" unless set; --standalone draws a new one per launch). None when there is none."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm job {os.environ['SLURM_JOB_ID']}"
    run_id = os.environ.get("LUMINA_RUN_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return None if run_id == "none" else f"run id {run_id}"


def _who(holder: dict[str, Any] | None, now: float) -> str:
    if holder is None:
        return "an unreadable lock (empty or not a lock)"
    age = _heartbeat_age(holder, now)
    beat = "no heartbeat" if age is None else f"heartbeat {max(age, 0.0):.0f} s old"
    job = f", {holder['job']}" if holder.get("job") else ""
    return f"pid {holder['pid']} on {holder['host']}{job}, {beat}"


def _stale_reason(holder: dict[str, Any] | None, now: float) -> str | None:
    """Why the lock no longer protects a working run, or None when its run may still be writing."""
    if holder is None:
        return "it cannot be read"
    age = _heartbeat_age(holder, now)
    if age is not None and age > LOCK_LEASE_S:
        return f"its heartbeat is older than the {LOCK_LEASE_S:.0f} s lease"
    job = launcher_job()
    if job is not None and holder.get("job") == job and holder.get("token") not in _HELD_TOKENS:
        # a launcher starts a job's next launch only once the last one is gone: its lock is that launch's leftover
        return f"it was left by an earlier launch of this job ({job})"
    if holder["host"] != socket.gethostname():
        return None  # its process cannot be checked from here: only the lease ends it
    if holder["pid"] == os.getpid():
        own = holder.get("token") in _HELD_TOKENS
        return None if own else "it names this process, which does not hold it (a restarted container)"
    return None if _alive(holder["pid"]) else "that process is gone"


class RunLock:
    """One run per run directory: two runs writing one directory interleave their metrics and mix checkpoints.

    The lock is a lease: while held, a daemon thread rewrites its heartbeat every LOCK_HEARTBEAT_S; a lock whose
    heartbeat is older than LOCK_LEASE_S, that an earlier launch of the same job left (launcher_job: a SLURM requeue,
    a relaunch with the same run id, on any host), that names a process gone from this host, or that cannot be read,
    is stale and taken over with a warning. `force` breaks any lock."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.held = False
        self._holder: dict[str, Any] = {}
        self._stop = threading.Event()
        self._beats: threading.Thread | None = None

    def acquire(self, *, force: bool = False) -> str | None:
        """Take the lock (E305 while another run holds it); returns a warning when an existing lock was taken over
        or, with `force`, broken."""
        now = time.time()
        token = uuid.uuid4().hex
        self._holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": token, "started": now,
                        "job": launcher_job()}  # fmt: skip
        warning = None
        for _ in range(3):
            if self._create():
                self.held = True
                _HELD_TOKENS.add(token)
                self._start_heartbeat()
                return warning
            warning = self._judge_and_take_over(force=force) or warning
        raise CheckpointError("E305", f"cannot take {self.path}", "another run is starting in this directory")

    def _create(self) -> bool:
        self._holder["heartbeat"] = time.time()
        try:
            return _publish(self.path, json.dumps(self._holder).encode())
        except OSError as exc:
            raise CheckpointError(
                "E304", f"cannot write the run lock {self.path}: {exc}", "free space or fix the directory's permissions"
            ) from exc

    def _judge_and_take_over(self, *, force: bool) -> str | None:
        """Take an existing lock over if it is stale (or `force`); E305 while its run may still be writing."""
        now, seen = time.time(), self._read()
        if seen is None:
            return None  # it went away meanwhile: try to create ours again
        holder = _parse(seen)
        reason = "--force-unlock" if force else _stale_reason(holder, now)
        if reason is None:
            raise CheckpointError(
                "E305",
                f"{self.path.parent} is in use by another run ({_who(holder, now)})",
                f"give this run another --experiment-name or wait for that run; its lock expires "
                f"{LOCK_LEASE_S:.0f} s after its last heartbeat; if that run is gone, --force-unlock takes it now",
            )
        self._set_aside(seen, force=force)
        if force:
            return f"--force-unlock: broke the run lock of {_who(holder, now)}"
        return f"took over the run lock of {_who(holder, now)}: {reason}"

    def _set_aside(self, seen: bytes, *, force: bool) -> None:
        """Remove the lock judged stale without racing another starter: rename it to a unique name (atomic), then
        check it is still what was judged (any renewal makes a stale lock fresh; `force` breaks the same holder's
        renewed lock); if it changed meanwhile, put it back and stop."""
        aside = self.path.with_name(f"{LOCK_FILE}.{uuid.uuid4().hex}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone else removed it: the next create decides
        try:
            moved = aside.read_bytes()
            if (_identity(moved) != _identity(seen)) if force else (moved != seen):
                _link(aside, self.path, moved)
                raise CheckpointError("E305", f"cannot take {self.path}: it changed meanwhile (another run took or "
                                      "renewed it)", "another run holds this directory")  # fmt: skip
        finally:
            aside.unlink(missing_ok=True)

    def _read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:  # unreadable (permissions, I/O error): judged like an empty lock
            return b""

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._beats = threading.Thread(target=self._heartbeat_loop, name="run-lock-heartbeat", daemon=True)
        self._beats.start()

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            if not self._beat():
                print(f"warning: the run lock {self.path} was broken by another run (--force-unlock or an expired "
                      f"lease); this run no longer holds it", file=sys.stderr, flush=True)  # fmt: skip
                return

    def _beat(self) -> bool:
        """Rewrite the lock with a fresh heartbeat (temp file + rename: never empty); False once it is another's.
        The new content is on the disk before the lock is checked, so that the check and the rename are close."""
        self._holder["heartbeat"] = time.time()
        try:
            tmp = _write_temp(self.path.parent, json.dumps(self._holder).encode())
        except OSError:
            return True  # a full disk: skipped, the next beat tries again (a lease is 10 beats)
        try:
            current = _parse(self._read())
            if current is not None and current.get("token") != self._holder["token"]:
                return False
            if current is not None:  # None: mid take-over or removed by hand, not ours to recreate
                with contextlib.suppress(OSError):
                    os.replace(tmp, self.path)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, unless another run broke it and holds it now."""
        if not self.held:
            return
        self._stop.set()
        if self._beats is not None:
            self._beats.join(timeout=10.0)  # it waits on the event; only a beat in flight (one file write) delays it
        current = _parse(self._read())
        if current is not None and current.get("token") == self._holder["token"]:
            self.path.unlink(missing_ok=True)
        _HELD_TOKENS.discard(str(self._holder["token"]))
        self.held = False
