"""Out-of-memory backoff: a training step that runs out of memory shrinks the micro-batch and grows the gradient
accumulation by the same factor (the global batch, and so the rows of every step, stay the same), then training
restarts from the last verified checkpoint (or from the start) with a freshly built engine.

One process retries in place. With several ranks, the ranks that did not run out of memory wait inside a collective
the failing rank never joins, so nothing can be retried in place: the failing rank records the smaller shape in the
run directory and stops with E204; the next launch of the same run (e.g. `--auto-resume`, or a SLURM requeue) picks it
up. The recorded shape applies only to the same preset, sequence length, layout and number of processes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lumina_ds.config.changes import revise
from lumina_ds.config.run import RunConfig
from lumina_ds.errors import MemoryPlanError

BACKOFF_FILE = "oom_backoff.json"
Log = Callable[[str], None]


class StepOutOfMemoryError(MemoryPlanError):
    """E204 raised by a training step; the session may back off and retry."""


@dataclass(frozen=True)
class BatchShape:
    micro_batch_size: int
    grad_accum: int

    def __str__(self) -> str:
        return f"micro-batch {self.micro_batch_size} x accumulation {self.grad_accum}"


def smaller_shape(shape: BatchShape) -> BatchShape | None:
    """The micro-batch divided by its smallest prime factor (halved when even), accumulation multiplied by it; None
    at micro-batch 1, the floor."""
    micro = shape.micro_batch_size
    if micro <= 1:
        return None
    factor = next(f for f in range(2, micro + 1) if micro % f == 0)
    return BatchShape(micro // factor, shape.grad_accum * factor)


def shape_of(run: RunConfig) -> BatchShape:
    return BatchShape(run.train.micro_batch_size, run.train.grad_accum)


def layout_key(run: RunConfig, world_size: int) -> dict[str, Any]:
    """What a recorded backoff is valid for: the same model, rows, layout and number of processes."""
    dist = run.distributed
    model = {k: v for k, v in asdict(run.model).items() if k != "vocab_size"}  # padded to the tokenizer later
    return {"preset": run.preset, "model": model, "seq_len": run.seq_len, "world_size": world_size,
            "zero_stage": dist.zero_stage, "expert_parallel_size": dist.expert_parallel_size,
            "offload": dist.offload, "gradient_checkpointing": run.train.gradient_checkpointing,
            "precision": run.train.precision}  # fmt: skip


def record_backoff(run_dir: Path, *, key: dict[str, Any], shape: BatchShape, reason: str) -> None:
    path = run_dir / BACKOFF_FILE
    tmp = path.with_suffix(f".tmp{id(shape)}")
    tmp.write_text(json.dumps({"key": key, "shape": asdict(shape), "reason": reason}, indent=2) + "\n")
    tmp.replace(path)


def recorded_backoff(run_dir: Path, *, key: dict[str, Any]) -> tuple[BatchShape, str] | None:
    """The shape an earlier out-of-memory left for this layout, with why; None if none applies."""
    try:
        saved = json.loads((run_dir / BACKOFF_FILE).read_text())
    except (OSError, ValueError):
        return None
    if saved.get("key") != json.loads(json.dumps(key)):  # compared as JSON, as it was written
        return None
    return BatchShape(**saved["shape"]), str(saved.get("reason", ""))


def apply_recorded_backoff(run: RunConfig, *, world_size: int, log: Log) -> RunConfig:
    """`run` with the micro-batch a recorded backoff left for this layout, when it is smaller than asked (and the
    global batch is the one asked for); else `run` as it is."""
    found = recorded_backoff(run.logging.run_dir, key=layout_key(run, world_size))
    if found is None or found[0].micro_batch_size >= run.train.micro_batch_size:
        return run
    shape, reason = found
    before = shape_of(run)
    if before.micro_batch_size * before.grad_accum != shape.micro_batch_size * shape.grad_accum:
        return run  # another global batch was asked for: the user changed the run, the record does not apply
    log(f"out-of-memory backoff recorded in {BACKOFF_FILE} ({reason}): {before} -> {shape}")
    return with_shape(run, shape, reason=f"the backoff recorded in {BACKOFF_FILE}", log=log)


def with_shape(run: RunConfig, shape: BatchShape, *, reason: str, log: Log) -> RunConfig:
    changes = {"train.micro_batch_size": shape.micro_batch_size, "train.grad_accum": shape.grad_accum}
    return revise(run, changes, reason=reason, log=log)


def back_off(run: RunConfig, *, world_size: int, error: str, log: Log) -> RunConfig:
    """After a step ran out of memory: `run` with the next smaller micro-batch, recorded in the run directory; E204
    at the floor or with several ranks (after recording, so the next launch starts smaller)."""
    before = shape_of(run)
    smaller = smaller_shape(before)
    if smaller is None:
        raise MemoryPlanError("E204", f"{error}; already at micro-batch 1, nothing left to back off",
                              "raise --zero-stage, use --offload, lower --seq-len or turn on "
                              "--gradient-checkpointing; `lumina-ds plan` sizes a layout")  # fmt: skip
    key = layout_key(run, world_size)  # before the change: the next launch asks for the same shape
    record_backoff(run.logging.run_dir, key=key, shape=smaller, reason=f"{error[:160]} at {before}")
    if world_size > 1:
        raise MemoryPlanError("E204", f"{error}; recorded a backoff to {smaller} in {BACKOFF_FILE}",
                              "relaunch the same run (e.g. with --auto-resume): it starts at the smaller micro-batch "
                              "from the last checkpoint")  # fmt: skip
    log(f"out of memory ({error[:160]}): backing off from {before} to {smaller}, restarting from the last checkpoint")
    return with_shape(run, smaller, reason="out of memory", log=log)
