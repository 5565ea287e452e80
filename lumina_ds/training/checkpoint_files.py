"""A checkpoint tag's files: the manifest of sizes and checksums, its verification, and loading DeepSpeed's pickles
with weights only (no code runs from a checkpoint, whoever wrote it)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

import torch
import xxhash

from lumina_ds.distributed.collectives import all_gather_object
from lumina_ds.errors import CheckpointError
from lumina_ds.run_dir import COMPLETE_MARKER, INDEX_FILE, fsync_path

CHUNK = 8 << 20
WEIGHTS_STAGING = ".weights.saving-"  # `<tag>/.weights.saving-<token>`: consolidated weights on their way into a tag
Manifest = dict[str, dict[str, Any]]  # {path relative to the tag: {size, xxh3}}
# the only classes DeepSpeed 0.19.8 puts in its model- and optimizer-state pickles (ZeRO 0-3, native MoE, AutoEP,
# bf16, offload, fp16's dynamic loss scaler); anything else is refused by name
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def file_digest(path: Path) -> str:
    """xxh3-128 of the file's bytes: fast enough that the disk decides the time (benchmarks/NOTES.md)."""
    digest = xxhash.xxh3_128()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return str(digest.hexdigest())


def tag_files(tag_dir: Path) -> list[Path]:
    """Every file of a tag but the completion marker, in a fixed order."""
    return sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)


class HashingFile:
    """A file torch.save writes through: its checksum is computed from the bytes on their way to the disk, so a save
    is never read back to list it."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "wb")  # noqa: SIM115  # closed by close(), after torch.save's last write
        self._digest = xxhash.xxh3_128()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._digest.update(view)
        self.size += view.nbytes
        return self._file.write(view)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> dict[str, Any]:
        self._file.close()
        return {"size": self.size, "xxh3": str(self._digest.hexdigest())}


@contextlib.contextmanager
def hashed_while_written(engine: Any) -> Iterator[dict[str, dict[str, Any]]]:
    """Within the block, every file DeepSpeed's checkpoint engine saves (model, optimizer and expert states) is
    checksummed as it is written: {absolute path: {size, xxh3}}. An engine without DeepSpeed's `checkpoint_engine`
    records nothing (its files are hashed by reading)."""
    written: dict[str, dict[str, Any]] = {}
    checkpoint_engine: Any = getattr(engine, "checkpoint_engine", None)
    original = getattr(checkpoint_engine, "save", None)
    if original is None or type(checkpoint_engine).__name__ != "TorchCheckpointEngine":
        yield written
        return
    serialization = checkpoint_engine.zipfile_serialization

    def save(state_dict: Any, path: str) -> None:
        out = HashingFile(path)
        try:
            torch.save(state_dict, cast(IO[bytes], out), _use_new_zipfile_serialization=serialization)
        finally:
            written[os.path.abspath(path)] = out.close()

    checkpoint_engine.save = save
    try:
        yield written
    finally:
        checkpoint_engine.save = original


def build_manifest(tag_dir: Path, *, rank: int, world_size: int, written: Manifest | None = None) -> Manifest:
    """{relative path: {size, xxh3}} of every file (collective). `written` holds this rank's files checksummed while
    written (by absolute path); every other file is read and hashed by one rank, each rank a share."""
    own = {str(Path(p).relative_to(tag_dir.resolve())): v for p, v in (written or {}).items()}
    manifest: Manifest = {}
    for part in all_gather_object(own):
        manifest.update(part)
    rest = [p for p in tag_files(tag_dir) if str(p.relative_to(tag_dir)) not in manifest]
    mine = {
        str(p.relative_to(tag_dir)): {"size": p.stat().st_size, "xxh3": file_digest(p)}
        for i, p in enumerate(rest)
        if i % world_size == rank
    }
    for part in all_gather_object(mine):
        manifest.update(part)
    return manifest


def write_marker(tag_dir: Path, meta: dict[str, Any]) -> None:
    """`complete.json`, whole or not at all: a temporary file renamed into place and synced."""
    tmp = tag_dir / f".{COMPLETE_MARKER}.tmp"
    with tmp.open("w") as handle:
        json.dump(meta, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, tag_dir / COMPLETE_MARKER)
    fsync_path(tag_dir)


def install_weights(tag_dir: Path, staging: Path) -> None:
    """Move the consolidated weights written in `staging` (inside the complete tag) into place, the index last, and
    list them in its `complete.json`. A kill in between leaves whole files the manifest does not list yet: the tag
    still verifies, and a reader finds whole weights or none."""
    files = sorted(staging.iterdir(), key=lambda p: (p.name == INDEX_FILE, p.name))
    marker = json.loads((tag_dir / COMPLETE_MARKER).read_text())
    for path in files:
        marker["files"][path.name] = {"size": path.stat().st_size, "xxh3": file_digest(path)}
    for path in files:
        os.replace(path, tag_dir / path.name)
    write_marker(tag_dir, marker)
    shutil.rmtree(staging, ignore_errors=True)


def check_files(tag_dir: Path, manifest: dict[str, dict[str, Any]], *, rank: int, world_size: int) -> str | None:
    """Why the tag does not match its manifest (a missing, resized or changed file), or None. Collective: every
    rank checks a share and every rank gets the same answer."""
    problems = file_problems(tag_dir, manifest, rank=rank, world_size=world_size)
    found = sorted(p for part in all_gather_object(problems) for p in part)
    return "; ".join(found) if found else None


def file_problems(
    tag_dir: Path, manifest: dict[str, dict[str, Any]], *, rank: int = 0, world_size: int = 1
) -> list[str]:
    """This rank's share of check_files, without a collective (a backup thread checks its copy alone)."""
    problems = []
    for i, (name, expected) in enumerate(sorted(manifest.items())):
        if i % world_size != rank:
            continue
        path = tag_dir / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, {expected['size']} were written")
        elif file_digest(path) != expected["xxh3"]:
            problems.append(f"{name} does not match its checksum")
    return problems


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within the block every torch.load runs with weights_only=True, whatever its caller passes (DeepSpeed passes
    False): tensors, plain containers and the DEEPSPEED_GLOBALS allowlist only; a pickle that would run code is
    refused instead."""
    import importlib

    allowed = []
    for dotted in DEEPSPEED_GLOBALS:
        module, _, name = dotted.rpartition(".")
        with contextlib.suppress(ImportError, AttributeError):
            allowed.append(getattr(importlib.import_module(module), name))
    original = torch.load

    def load(f: Any, map_location: Any = None, *args: Any, weights_only: bool | None = None, **kwargs: Any) -> Any:
        with torch.serialization.safe_globals(allowed):
            return original(f, map_location, *args, weights_only=True, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def describe_load_error(exc: BaseException) -> str:
    """One line for a failed load: a refused pickle says which global it wanted."""
    text = str(exc).strip().splitlines()
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in str(exc):
        wanted = next((line.strip() for line in text if "Unsupported global" in line), "a non-tensor object")
        return f"it holds objects a checkpoint should not ({wanted}): refused without running them"
    return text[0] if text else type(exc).__name__


def corrupt_checkpoint(tag_dir: Path, exc: BaseException) -> CheckpointError:
    """The E303 for a tag whose files verify but do not load (raise it from the load's exception)."""
    return CheckpointError(
        "E303",
        f"checkpoint {tag_dir} cannot be loaded: {describe_load_error(exc)}",
        "resume from an earlier tag (lumina-ds falls back to one by itself unless --strict-resume is given)",
    )
