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

import json
import os
import re
import socket
from collections.abc import Iterable
from pathlib import Path

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
        return path.parent, path.name
    if TAG_PATTERN.match(path.name):
        raise CheckpointError(
            "E303",
            f"checkpoint {path} is incomplete (no {COMPLETE_MARKER}: the save was interrupted)",
            "resume from an earlier tag in the same checkpoints/ directory",
        )
    checkpoints = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    tags = list_complete_tags(checkpoints)
    if not tags:
        raise CheckpointError("E303", f"no complete checkpoint under {path}", "train with --save-every-n-steps first")
    return checkpoints, tags[-1]


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunLock:
    """One run per run directory: two runs writing one directory interleave their metrics and mix checkpoints."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.held = False

    def acquire(self) -> str | None:
        """Take the lock; returns a warning when a stale lock (a dead process on this host) was taken over."""
        warning = None
        for _ in range(2):
            if self._create():
                self.held = True
                return warning
            holder = self._holder()
            if holder.get("host") != socket.gethostname() or _alive(int(str(holder.get("pid", 0)))):
                raise CheckpointError(
                    "E305",
                    f"{self.path.parent} is in use by another run (pid {holder.get('pid')} on {holder.get('host')})",
                    f"give this run another --experiment-name, or wait for that run; if it is gone, delete {self.path}",
                )
            self.path.unlink(missing_ok=True)
            warning = f"took over the run lock of pid {holder.get('pid')} on this host, which is gone"
        raise CheckpointError("E305", f"cannot take {self.path}", "another run is starting in this directory")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump({"host": socket.gethostname(), "pid": os.getpid()}, handle)
        return True

    def _holder(self) -> dict[str, object]:
        try:
            return dict(json.loads(self.path.read_text()))
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
