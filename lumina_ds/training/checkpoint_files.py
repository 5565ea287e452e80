"""A checkpoint tag's files: the manifest of sizes and checksums, its verification, and loading DeepSpeed's pickles
with weights only (no code runs from a checkpoint, whoever wrote it)."""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import xxhash

from lumina_ds.distributed.collectives import all_gather_object
from lumina_ds.errors import CheckpointError
from lumina_ds.run_dir import COMPLETE_MARKER

CHUNK = 8 << 20
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


def build_manifest(tag_dir: Path, *, rank: int, world_size: int) -> dict[str, dict[str, Any]]:
    """{relative path: {size, xxh3}} of every file; each rank hashes its share (collective)."""
    files = tag_files(tag_dir)
    mine = {
        str(p.relative_to(tag_dir)): {"size": p.stat().st_size, "xxh3": file_digest(p)}
        for i, p in enumerate(files)
        if i % world_size == rank
    }
    manifest: dict[str, dict[str, Any]] = {}
    for part in all_gather_object(mine):
        manifest.update(part)
    return manifest


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
