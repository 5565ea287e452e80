"""Elastic resume: a checkpoint saved by W processes with expert-parallel size e continues on W' processes with e'.

The data side is exact by construction: the saved position is one global row (data/loading/global_order.py), and with
the same global batch and micro-batch (`--grad-accum` making up for fewer processes) every step trains on the same rows.
The model side goes through DeepSpeed's universal checkpoint (training/universal.py): rank 0 converts the tag once into
`<run dir>/checkpoints/.universal/<tag>`, and every rank loads it into an engine built with `load_universal`, which is
why the decision is taken here, before the engine exists.

Refused with E303, with the reason: a ZeRO stage change (DeepSpeed's ZeRO-1/2 and ZeRO-3 states differ in layout and
its universal loader asserts on the model-states file of the other), ZeRO-0 (no ZeRO states to convert), and
native-MoE checkpoints (the converter cannot reshape `deepspeed.moe.layer.MoE` experts).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lumina_ds.config.io import config_to_dict
from lumina_ds.config.run import RunConfig
from lumina_ds.distributed.collectives import any_rank
from lumina_ds.distributed.env import DistInfo
from lumina_ds.distributed.parallelize import uses_autoep
from lumina_ds.errors import CheckpointError
from lumina_ds.run_dir import CHECKPOINTS_DIR, COMPLETE_MARKER
from lumina_ds.training.checkpoint import Log, PlainLoader, TagLoader
from lumina_ds.training.checkpoint_files import corrupt_checkpoint
from lumina_ds.training.checkpoint_state import Resumed, load_trainer_state, read_json, read_resumed
from lumina_ds.training.engine import Engine
from lumina_ds.training.universal import (
    adapted_load,
    convert,
    convert_share,
    finish,
    prepare,
    remove_others,
    reusable,
    staging,
)

UNIVERSAL_DIR = ".universal"
_T = TypeVar("_T")
# peak bytes on disk of a conversion (output and temporary fragments) per byte of the tag, measured and rounded up
# (benchmarks/NOTES.md, "Elastic resume: the universal conversion split across ranks"): split, at most 1.47 (debug,
# ZeRO-3, where each small tensor's file overhead counts; 0.73-1.13 for m70_memory); DeepSpeed's one-process converter
# keeps every fragment until the end, at most 2.15 (1.19-1.45 for m70_memory)
SPACE_FACTOR = 1.5
SINGLE_PROCESS_SPACE_FACTOR = 2.25
# DeepSpeed's single-process converter, for layouts the split does not cover: its measured rate (m70_memory's tag,
# 1460 MiB in 30.1 s on 2 loaded cores), and the largest tag it is left to (about 1.2 h at that rate)
SINGLE_PROCESS_RATE = 48 * 2**20
SINGLE_PROCESS_LIMIT = 200 * 2**30


@dataclass(frozen=True)
class Layout:
    """What a checkpoint's resumability depends on: processes, expert parallelism, ZeRO stage, batch shape."""

    world_size: int
    expert_parallel_size: int
    zero_stage: int
    native_moe: bool
    micro_batch_size: int
    grad_accum: int
    swapped_to_nvme: bool = False  # ZeRO-Infinity: the optimizer states live in the tag's swap files

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    def describe(self) -> str:
        return f"{self.world_size} process(es), expert-parallel size {self.expert_parallel_size}"

    def batch(self) -> str:
        return (
            f"{self.global_batch} rows (micro-batch {self.micro_batch_size} x accumulation {self.grad_accum} x "
            f"{self.world_size} process(es))"
        )

    @classmethod
    def of(cls, config: dict[str, Any], world_size: int) -> Layout:
        """From a run config as saved in a checkpoint (config_to_dict)."""
        dist, train, moe = config["distributed"], config["train"], config["model"]["moe"]
        native = dist["moe_backend"] == "native" and moe["num_experts"] > 0
        return cls(
            world_size,
            dist["expert_parallel_size"],
            dist["zero_stage"],
            native,
            train["micro_batch_size"],
            train["grad_accum"],
            dist.get("offload_device") == "nvme" and dist["offload"] != "none",
        )


def saved_layout(tag_dir: Path) -> tuple[Layout, dict[str, Any]]:
    """The layout and run config a verified tag was saved with."""
    config = load_trainer_state(tag_dir)["config"]
    return Layout.of(config, int(read_json(tag_dir / COMPLETE_MARKER)["world_size"])), config


def continuation_note(saved: Layout, now: Layout) -> str | None:
    """One line when the steps after the resume cannot repeat the saved run's continuation, else None."""
    if saved.global_batch != now.global_batch:
        accum, rest = divmod(saved.global_batch, now.micro_batch_size * now.world_size)
        keep = f"; --grad-accum {accum} keeps {saved.global_batch}" if accum and not rest else ""
        return (
            f"resume: the continuation is not exact: the global batch changes from {saved.batch()} to "
            f"{now.batch()}, so each step takes other rows than the saved run's next steps (the data goes on at "
            f"the next row){keep}"
        )
    if saved.micro_batch_size != now.micro_batch_size:
        return (
            f"resume: the continuation is not exact: the micro-batch changes from {saved.micro_batch_size} to "
            f"{now.micro_batch_size} rows; each step takes the same {now.global_batch} rows, but the loss is "
            "averaged per micro-batch, so the losses differ slightly from the saved run's"
        )
    return None


def refuse_unloadable(saved: Layout, now: Layout, tag_dir: Path) -> None:
    """E303 for what neither DeepSpeed nor this module can carry across (see the module docstring)."""
    where = f"checkpoint {tag_dir.name} was saved at"
    if saved.zero_stage != now.zero_stage:
        raise CheckpointError(
            "E303",
            f"{where} ZeRO stage {saved.zero_stage}, this run has {now.zero_stage}: DeepSpeed cannot load ZeRO states "
            "across stages (their layouts differ)",
            f"resume with --zero-stage {saved.zero_stage}",
        )
    if (saved.world_size, saved.expert_parallel_size) == (now.world_size, now.expert_parallel_size):
        return
    change = f"{where} {saved.describe()}, this run has {now.describe()}"
    same = f"resume with {saved.world_size} process(es) and --expert-parallel-size {saved.expert_parallel_size}"
    if saved.native_moe:
        raise CheckpointError(
            "E303",
            f"{change}: the experts of the native DeepSpeed MoE layer (--moe-backend native) cannot be converted to a "
            "universal checkpoint (DeepSpeed's converter fails to reshape them)",
            f"{same}; train with --moe-backend autoep to resume on other sizes",
        )
    if saved.swapped_to_nvme:
        raise CheckpointError(
            "E303",
            f"{change}: its optimizer states were swapped to NVMe (--offload-device nvme); DeepSpeed's ZeRO files then "
            "hold empty tensors for the swapped groups, which a universal checkpoint would carry over as zeros",
            f"{same}, or train with --offload-device cpu to resume on other sizes",
        )
    if saved.zero_stage == 0:
        raise CheckpointError(
            "E303",
            f"{change}: changing sizes goes through DeepSpeed's universal checkpoint, which converts ZeRO 1-3 states "
            "only (ZeRO-0 saves none)",
            f"{same}; train with --zero-stage 1, 2 or 3 to resume on other sizes",
        )


class UniversalLoader:
    """Loads the one tag saved on other sizes through its verified universal conversion; the run's own later tags
    (a rewind) are plain checkpoints of this run's size."""

    universal = True

    def __init__(self, tag_dir: Path, universal: Path, saved: Layout, run: RunConfig, info: DistInfo) -> None:
        self.tag_dir, self.converted, self.saved, self.info = tag_dir, universal, saved, info
        self.autoep_target, self.num_experts = uses_autoep(run), run.model.moe.num_experts
        self.plain = PlainLoader(info)

    def load(self, engine: Engine, tag_dir: Path) -> Resumed:
        if tag_dir != self.tag_dir:
            return self.plain.load(engine, tag_dir)
        try:
            with adapted_load(engine, self.converted, autoep_target=self.autoep_target, num_experts=self.num_experts):
                path, _ = engine.load_checkpoint(str(self.converted.parent), self.converted.name)
        except CheckpointError:
            raise
        except Exception as exc:  # DeepSpeed's loader asserts and raises anything on a file it cannot use
            raise corrupt_checkpoint(self.converted, exc) from exc
        if path is None:
            raise CheckpointError("E303", f"DeepSpeed could not load the universal checkpoint {self.converted}")
        # the data position is global (the same in every rank's file); the RNG streams of a rank that did not exist
        # are those of rank `rank % saved ranks` (nothing random is drawn in a training step of our models)
        return read_resumed(self.tag_dir, rank=self.info.rank % self.saved.world_size)


def _attempt(step: Callable[[], _T], target: Path) -> tuple[_T | None, CheckpointError | None]:
    """Run one rank's part of the conversion; its failure as the E303 every rank raises together."""
    try:
        return step(), None
    except CheckpointError as exc:
        return None, exc
    except OSError as exc:
        return None, CheckpointError(
            "E303",
            f"cannot write the universal checkpoint {target}: {exc}",
            "free disk space, or resume on the sizes that saved the checkpoint",
        )
    except Exception as exc:  # e.g. an unreadable checksum list: raised here alone, the others would wait forever
        return None, CheckpointError("E303", f"the universal conversion into {target} failed: {exc!r}")


def _together(problem: CheckpointError | None, tag_dir: Path) -> None:
    """Every rank raises when one failed (a rank that went on alone would wait in the next collective forever)."""
    if any_rank(problem is not None):
        raise problem or CheckpointError("E303", f"another rank could not convert {tag_dir}", "see rank 0's error")


def _decide(tag_dir: Path, target: Path, info: DistInfo, log: Log) -> bool:
    """Rank 0: reuse a verified conversion, or check the space and prepare a fresh one. Whether to convert, on
    every rank."""
    convert_now, problem = False, None
    if info.is_main:
        why = reusable(target, tag_dir)
        if why is None:
            log(f"elastic resume: reusing the verified universal checkpoint {target}")
        else:
            _, problem = _attempt(lambda: _start(tag_dir, target), target)
            convert_now = True
    _together(problem, tag_dir)
    return any_rank(convert_now)


def _start(tag_dir: Path, target: Path) -> None:
    check_conversion_space(tag_dir, target.parent)
    prepare(target)


def _universal(tag_dir: Path, run_dir: Path, info: DistInfo, log: Log) -> Path:
    """Every rank converts its share of the parameters (or reuses a verified conversion); rank 0 finishes it;
    every rank gets the path or the same E303."""
    target = run_dir / CHECKPOINTS_DIR / UNIVERSAL_DIR / tag_dir.name
    try:
        if _decide(tag_dir, target, info, log):
            _convert(tag_dir, target, info, log)
    except CheckpointError:
        if info.is_main:
            shutil.rmtree(staging(target), ignore_errors=True)
        raise
    if info.is_main:
        remove_others(target)
    return target


def _convert(tag_dir: Path, target: Path, info: DistInfo, log: Log) -> None:
    """Every rank converts its share; rank 0 finishes (or, for a layout the split does not cover, converts alone)."""
    started = time.perf_counter()
    split, problem = _attempt(lambda: convert_share(tag_dir, target, rank=info.rank, world=info.world_size), target)
    _together(problem, tag_dir)
    if info.is_main:
        _, problem = _attempt(lambda: _complete(tag_dir, target, split=bool(split)), target)
    _together(problem, tag_dir)
    how = f"split across {info.world_size} process(es)" if split else "in one process (DeepSpeed's converter)"
    log(
        f"elastic resume: converted {tag_dir.name} to a universal checkpoint {how} in "
        f"{time.perf_counter() - started:.1f}s -> {target}"
    )


def _complete(tag_dir: Path, target: Path, *, split: bool) -> None:
    if split:
        finish(tag_dir, target)
        return
    size = _tag_bytes(tag_dir)
    if size > SINGLE_PROCESS_LIMIT:
        hours = size / SINGLE_PROCESS_RATE / 3600
        raise CheckpointError(
            "E303",
            f"{tag_dir.name} ({size / 2**30:.1f} GB) needs DeepSpeed's converter in one process, which converted "
            f"{SINGLE_PROCESS_RATE / 2**20:.0f} MB/s here: about {hours:.1f} h while every other rank waits",
            "resume on the sizes that saved it",
        )
    check_conversion_space(tag_dir, target.parent, SINGLE_PROCESS_SPACE_FACTOR)
    convert(tag_dir, target)


def _tag_bytes(tag_dir: Path) -> int:
    return sum(int(f["size"]) for f in read_json(tag_dir / COMPLETE_MARKER).get("files", {}).values())


def check_conversion_space(tag_dir: Path, folder: Path, factor: float = SPACE_FACTOR) -> None:
    """A conversion needs `factor` x the tag at its peak (the temporary fragments included), before anything is
    written."""
    need = int(_tag_bytes(tag_dir) * factor)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise CheckpointError(
            "E303",
            f"converting {tag_dir.name} needs about {need / 2**30:.2f} GB in {folder} ({factor} x the tag, its "
            f"temporary fragments included), {free / 2**30:.2f} GB are free",
            "free disk space",
        )


def check_layout(tag_dir: Path, run: RunConfig, info: DistInfo) -> None:
    """E303 for a tag this run cannot load at all on its sizes (before any data or model work)."""
    refuse_unloadable(saved_layout(tag_dir)[0], Layout.of(config_to_dict(run), info.world_size), tag_dir)


def tag_loader_for(tag_dir: Path, run: RunConfig, info: DistInfo, *, log: Log) -> TagLoader:
    """The loader for a verified tag: DeepSpeed's own when the world and expert-parallel size are the tag's, else a
    universal checkpoint converted here (before the engine: see the module docstring). E303 for what cannot be
    resumed at all, after one line if the continuation cannot be exact. Every rank calls it."""
    saved, _ = saved_layout(tag_dir)
    now = Layout.of(config_to_dict(run), info.world_size)
    refuse_unloadable(saved, now, tag_dir)
    note = continuation_note(saved, now)
    if note:
        log(note)
    if (saved.world_size, saved.expert_parallel_size) == (now.world_size, now.expert_parallel_size):
        return PlainLoader(info)
    universal = _universal(tag_dir, run.logging.run_dir, info, log)
    log(
        f"elastic resume: {tag_dir.name} was saved by {saved.describe()}; this run has {now.describe()} (DeepSpeed's "
        "universal checkpoint)"
    )
    return UniversalLoader(tag_dir, universal, saved, run, info)
