"""Consolidated weights for a tag saved without them (`checkpoint.consolidate: final` leaves them out of every save but
the run's last, so that a save fits a pre-emption signal): written into the tag from its DeepSpeed files when
`export`, `chat`, `generate` or `--init-from` first ask for them, in the dtype and under the names the save would have
written (tests/training/test_tag_weights.py compares both).

Two sources, by the layout that saved the tag:
- ZeRO 0-2 with expert-parallel size 1: every parameter is whole in DeepSpeed's `mp_rank_00_model_states.pt`, in the
  module's dtype; one file is read.
- ZeRO 1-3, or expert parallelism: DeepSpeed's universal checkpoint (the conversion elastic resume makes, reused when
  one of this tag is there), whose fp32 master weights are cast to the module's dtype (the module's bf16/fp16 weights
  are that same cast of the master weights).
Native-MoE layers (DeepSpeed keeps their experts in files of their own, and its converter cannot reshape them),
NVMe-swapped optimizer states and ZeRO-0 with expert parallelism have neither: a run with those layouts writes the
weights at every save (`writes_weights_later` is False for it).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from lumina_ds.config.io import load_config
from lumina_ds.distributed.consolidate import AUTOEP_RENAMES
from lumina_ds.errors import CheckpointError
from lumina_ds.hf.source import HF_CONFIG_FILE
from lumina_ds.models.transformer import Transformer
from lumina_ds.run_dir import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    has_weights,
    resolve_checkpoint,
    run_dir_of,
    write_shards,
)
from lumina_ds.training.checkpoint_files import (
    WEIGHTS_STAGING,
    describe_load_error,
    install_weights,
    weights_only_loads,
)
from lumina_ds.training.elastic import (
    SINGLE_PROCESS_SPACE_FACTOR,
    UNIVERSAL_DIR,
    Layout,
    check_conversion_space,
    saved_layout,
)
from lumina_ds.training.universal import convert, reusable

MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO 0-2, ZeRO-3
Log = Callable[[str], None]


def writes_weights_later(layout: Layout) -> bool:
    """Whether a tag saved with `layout` can get its consolidated weights after the run (see the module docstring)."""
    if layout.native_moe or layout.swapped_to_nvme:
        return False
    return layout.zero_stage >= 1 or layout.expert_parallel_size == 1


def ensure_weights(path: str | Path, *, log: Log = print) -> Path:
    """The tag `path` names (a run dir, checkpoints dir or tag), with consolidated weights written into it first if it
    has none; a Hugging Face model directory is returned as it is. Processes asking at once (every rank of an
    --init-from) take turns on a lock beside the tag: one writes, the others find the weights. E303 when the tag cannot
    be read or written."""
    path = Path(path).expanduser()
    if (path / HF_CONFIG_FILE).is_file() and not (path / CONFIG_FILE).is_file():
        return path
    checkpoints, tag = resolve_checkpoint(path)
    tag_dir = checkpoints / tag
    if has_weights(tag_dir):
        return tag_dir
    lock = checkpoints / f".{tag}.weights.lock"
    try:
        with lock.open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the holder exits, however it exits
            if not has_weights(tag_dir):
                _consolidate(tag_dir, run_dir_of(checkpoints), log)
    finally:
        lock.unlink(missing_ok=True)  # a process still waiting on it rechecks the weights once it holds it
    return tag_dir


def _consolidate(tag_dir: Path, run_dir: Path, log: Log) -> None:
    layout, _ = saved_layout(tag_dir)
    if not writes_weights_later(layout):
        why = "ZeRO-0 with expert parallelism"
        if layout.native_moe or layout.swapped_to_nvme:
            why = "the native MoE layer" if layout.native_moe else "NVMe-swapped optimizer states"
        raise CheckpointError(
            "E303",
            f"{tag_dir} has no consolidated weights, and its layout ({layout.describe()}, {why}) has no offline "
            "source for them",
            "use a tag that has model.safetensors (such layouts write it at every save unless --consolidate never)",
        )
    started = time.perf_counter()
    log(f"{tag_dir.name} has no consolidated weights (--consolidate final or never): writing them from its "
        "DeepSpeed files")  # fmt: skip
    try:
        _write_into(tag_dir, layout, run_dir)
    except OSError as exc:
        raise CheckpointError(
            "E303",
            f"cannot write consolidated weights into {tag_dir}: {exc}",
            "make the tag writable, or copy the run directory somewhere writable and point at the copy",
        ) from exc
    log(f"consolidated weights written into {tag_dir} in {time.perf_counter() - started:.1f}s")


def _write_into(tag_dir: Path, layout: Layout, run_dir: Path) -> None:
    config = load_config(run_dir / CONFIG_FILE)
    staging = tag_dir / f"{WEIGHTS_STAGING}{time.time_ns()}"
    shard_bytes = config.checkpoint.weights_shard_mb << 20
    shapes = _parameter_shapes(config.model)
    with weights_only_loads():
        if layout.expert_parallel_size == 1 and layout.zero_stage <= 2:
            named = _from_model_states(tag_dir, shapes)
        else:
            named = _from_universal(tag_dir, run_dir, shapes, _module_dtypes(tag_dir))
        try:
            write_shards(named, staging, max_shard_bytes=shard_bytes)
            install_weights(tag_dir, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _parameter_shapes(model_config: Any) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes in forward order, a tied weight once (as the save's consolidation writes)."""
    with torch.device("meta"):
        model = Transformer(model_config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _our_name(name: str) -> str:
    for old, new in AUTOEP_RENAMES:
        name = name.replace(old, new)
    return name


def _module_states(tag_dir: Path) -> dict[str, torch.Tensor]:
    path = next((tag_dir / name for name in MODEL_STATES if (tag_dir / name).is_file()), tag_dir / MODEL_STATES[0])
    try:
        module = torch.load(path, map_location="cpu")["module"]
    except Exception as exc:  # torch.load raises anything from UnpicklingError to EOFError on a bad file
        raise CheckpointError("E303", f"cannot read {path}: {describe_load_error(exc)}",
                              "the tag is damaged: use another tag") from exc  # fmt: skip
    return {_our_name(k): v for k, v in module.items()}


def _module_dtypes(tag_dir: Path) -> dict[str, torch.dtype]:
    """Each parameter's dtype in the module (ZeRO-3 saves empty placeholders, in the module's dtype); "" holds the
    most common one, for parameters DeepSpeed keeps out of the module's states (AutoEP's experts)."""
    dtypes = {name: tensor.dtype for name, tensor in _module_states(tag_dir).items()}
    counts = collections.Counter(dtypes.values())
    return {**dtypes, "": counts.most_common(1)[0][0] if counts else torch.float32}


def _from_model_states(tag_dir: Path, shapes: dict[str, tuple[int, ...]]) -> Iterator[tuple[str, torch.Tensor]]:
    module = _module_states(tag_dir)
    for name, shape in shapes.items():
        tensor = module.get(name)
        if tensor is None or tuple(tensor.shape) != shape:
            raise CheckpointError("E303", f"{tag_dir / MODEL_STATES[0]} has no {name} of shape {shape}",
                                  "the run's config.yaml must be the one that saved the tag")  # fmt: skip
        yield name, tensor


def _from_universal(
    tag_dir: Path, run_dir: Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype]
) -> Iterator[tuple[str, torch.Tensor]]:
    with _universal_of(tag_dir, run_dir) as universal:
        folders = {_our_name(p.name): p for p in (universal / "zero").iterdir() if p.is_dir()}
        for name, shape in shapes.items():
            if name not in folders:
                raise CheckpointError("E303", f"the universal conversion of {tag_dir.name} has no {name}",
                                      "the run's config.yaml must be the one that saved the tag")  # fmt: skip
            loaded = torch.load(folders[name] / "fp32.pt", map_location="cpu")
            master = loaded["param"] if isinstance(loaded, dict) else loaded
            yield name, master.reshape(shape).to(dtypes.get(name, dtypes[""]))


@contextlib.contextmanager
def _universal_of(tag_dir: Path, run_dir: Path) -> Iterator[Path]:
    """The tag's verified universal conversion: elastic resume's, or one made for the block and removed after it
    (it takes about the tag's size)."""
    target = run_dir / CHECKPOINTS_DIR / UNIVERSAL_DIR / tag_dir.name
    made = reusable(target, tag_dir) is not None
    if made:
        check_conversion_space(tag_dir, target.parent, SINGLE_PROCESS_SPACE_FACTOR)  # E303 before anything is written
        convert(tag_dir, target)
    try:
        yield target
    finally:
        if made:
            shutil.rmtree(target, ignore_errors=True)
