"""Elastic resume: a checkpoint saved by W processes with expert-parallel size e continues on W' processes with e'.

The data side is exact by construction: the saved position is one global row (data/global_order.py), and with the same
global batch and micro-batch (`--grad-accum` making up for fewer processes) every step trains on the same rows. The
model side goes through DeepSpeed's universal checkpoint (training/universal.py): rank 0 converts the tag once into
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lumina_ds.config.io import config_to_dict
from lumina_ds.config.run import RunConfig
from lumina_ds.distributed.collectives import any_rank
from lumina_ds.distributed.env import DistInfo, barrier
from lumina_ds.distributed.parallelize import uses_autoep
from lumina_ds.errors import CheckpointError
from lumina_ds.run_dir import CHECKPOINTS_DIR, COMPLETE_MARKER
from lumina_ds.training.checkpoint import CheckpointManager, Resumed
from lumina_ds.training.checkpoint_files import check_files, raise_corrupt
from lumina_ds.training.checkpoint_state import (
    STATE_DIR,
    TRAINER_FILE,
    load_rank_state,
    load_trainer_state,
    read_json,
    set_rng_state,
)
from lumina_ds.training.train_step import Engine
from lumina_ds.training.universal import adapted_load, convert, remove_others, reusable

UNIVERSAL_DIR = ".universal"


@dataclass(frozen=True)
class Layout:
    """What a checkpoint's resumability depends on: processes, expert parallelism, ZeRO stage, batch shape."""

    world_size: int
    expert_parallel_size: int
    zero_stage: int
    native_moe: bool
    micro_batch_size: int
    grad_accum: int

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
        )


def saved_layout(tag_dir: Path) -> tuple[Layout, dict[str, Any]] | None:
    """The layout and config a tag was saved with; None for tags written before our state was JSON, or whose state
    cannot be read (the verified load that follows names the damaged file and falls back to an older tag)."""
    if not (tag_dir / STATE_DIR / TRAINER_FILE).is_file():
        return None
    try:
        config = load_trainer_state(tag_dir)["config"]
        return Layout.of(config, int(read_json(tag_dir / COMPLETE_MARKER)["world_size"])), config
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None


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
    if saved.zero_stage == 0:
        raise CheckpointError(
            "E303",
            f"{change}: changing sizes goes through DeepSpeed's universal checkpoint, which converts ZeRO 1-3 states "
            "only (ZeRO-0 saves none)",
            f"{same}; train with --zero-stage 1, 2 or 3 to resume on other sizes",
        )


@dataclass
class ElasticResume:
    """A chosen tag and its verified universal conversion, loaded by every rank into an engine built for it."""

    tag_dir: Path
    universal: Path
    saved: Layout
    autoep_target: bool
    num_experts: int
    rank: int

    def load(self, engine: Engine) -> Resumed:
        try:
            with adapted_load(engine, self.universal, autoep_target=self.autoep_target, num_experts=self.num_experts):
                path, _ = engine.load_checkpoint(str(self.universal.parent), self.universal.name)
        except CheckpointError:
            raise
        except Exception as exc:  # DeepSpeed's loader asserts and raises anything on a file it cannot use
            raise raise_corrupt(self.universal, exc) from exc
        if path is None:
            raise CheckpointError("E303", f"DeepSpeed could not load the universal checkpoint {self.universal}")
        # the data position is global (the same in every rank's file); the RNG streams of a rank that did not exist
        # are those of rank `rank % saved ranks` (nothing random is drawn in a training step of our models)
        own = load_rank_state(self.tag_dir, rank=self.rank % self.saved.world_size)
        set_rng_state(own["rng"])
        saved = load_trainer_state(self.tag_dir)
        return Resumed(self.tag_dir, saved["trainer"], own["data"], saved["config"])


def _first_verified(tags: list[Path], info: DistInfo, *, strict: bool, log: Callable[[str], None]) -> Path:
    """The newest tag whose files match its manifest (collective), as CheckpointManager.load chooses."""
    for tag_dir in tags:
        meta = read_json(tag_dir / COMPLETE_MARKER)
        problem = (
            check_files(tag_dir, meta["files"], rank=info.rank, world_size=info.world_size) if "files" in meta else None
        )
        if problem is None:
            return tag_dir
        if strict:
            hint = "resume from an earlier tag, or drop --strict-resume to fall back to it"
            raise CheckpointError("E303", f"checkpoint {tag_dir} fails verification: {problem}", hint)
        log(f"warning: checkpoint {tag_dir.name} fails verification ({problem}): trying the previous one")
    raise CheckpointError("E303", "no checkpoint to resume from passes verification", "start afresh")


def _universal(tag_dir: Path, run_dir: Path, info: DistInfo, log: Callable[[str], None]) -> Path:
    """Rank 0 converts (or reuses a verified conversion); every rank gets the path or the same E303."""
    target = run_dir / CHECKPOINTS_DIR / UNIVERSAL_DIR / tag_dir.name
    problem: CheckpointError | None = None
    if info.is_main:
        try:
            why = reusable(target, tag_dir)
            if why is None:
                log(f"elastic resume: reusing the verified universal checkpoint {target}")
            else:
                _check_space(tag_dir, target.parent)
                started = time.perf_counter()
                convert(tag_dir, target)
                log(
                    f"elastic resume: converted {tag_dir.name} to a universal checkpoint in "
                    f"{time.perf_counter() - started:.1f}s -> {target}"
                )
            remove_others(target)
        except CheckpointError as exc:
            problem = exc
        except OSError as exc:
            problem = CheckpointError(
                "E303",
                f"cannot write the universal checkpoint {target}: {exc}",
                "free disk space, or resume on the sizes that saved the checkpoint",
            )
    if any_rank(problem is not None):
        raise problem or CheckpointError("E303", f"rank 0 could not convert {tag_dir}", "see rank 0's error")
    return target


def _check_space(tag_dir: Path, folder: Path) -> None:
    """A conversion takes about the tag's size (fp32 weights and the optimizer's moments)."""
    need = sum(f["size"] for f in read_json(tag_dir / COMPLETE_MARKER).get("files", {}).values())
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise CheckpointError(
            "E303",
            f"converting {tag_dir.name} needs about {need / 2**30:.2f} GB in {folder}, {free / 2**30:.2f} GB are free",
            "free disk space",
        )


def plan_elastic_resume(run: RunConfig, info: DistInfo, *, log: Callable[[str], None]) -> ElasticResume | None:
    """Before the engine is built: whether the resume changes the world or expert-parallel size (then the tag is
    chosen, verified and converted here), after one line if the continuation cannot be exact. E303 for what cannot
    be resumed at all. Every rank calls it."""
    manager = CheckpointManager(run.logging.run_dir, replace(run.checkpoint, backup_dir=None), info)
    if info.is_main:
        manager.recover()  # finish or undo a save a kill interrupted, before the tags are read
    barrier()
    candidates = manager.candidates()
    found = saved_layout(candidates[0]) if candidates else None
    if found is None:
        return None  # nothing to resume, or a tag from before our JSON state: the plain path handles it
    saved, config = found
    now = Layout.of(config_to_dict(run), info.world_size)
    refuse_unloadable(saved, now, candidates[0])
    note = continuation_note(saved, now)
    if note:
        log(note)
    if (saved.world_size, saved.expert_parallel_size) == (now.world_size, now.expert_parallel_size):
        return None
    if config.get("model") != config_to_dict(run.model):
        raise CheckpointError(
            "E303",
            "the checkpoint was trained with a different model architecture than this run's config",
            "resume with the same --preset/--config-file (see config.yaml in the run directory)",
        )
    tag_dir = _first_verified(candidates, info, strict=run.checkpoint.strict_resume, log=log)
    universal = _universal(tag_dir, run.logging.run_dir, info, log)
    log(
        f"elastic resume: {tag_dir.name} was saved by {saved.describe()}; this run has {now.describe()} (DeepSpeed's "
        "universal checkpoint)"
    )
    return ElasticResume(
        tag_dir, universal, saved, autoep_target=uses_autoep(run), num_experts=run.model.moe.num_experts, rank=info.rank
    )
