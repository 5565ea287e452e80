"""The one entry from a run's data settings to what training consumes: this rank's resumable batches, the evaluation
rows and the number of optimizer steps (`build_train_data`), and the text sample a new tokenizer learns from
(`training_texts`). Training knows nothing of sources, strategies or shards; it imports this module only."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from lumina_ds.config.run import DataConfig
from lumina_ds.data.loading.packing import PackedDataset
from lumina_ds.data.loading.pipeline import SourceSet, build_batches, eval_rows, micro_batches_for_epochs, open_sources
from lumina_ds.data.loading.profile import LoaderRate, measure_batches
from lumina_ds.data.loading.stream import PackedBatches
from lumina_ds.data.prepare.team import SOLO, Team, team_of
from lumina_ds.data.prepare.tokenize import EncodeSettings, PrepareReport
from lumina_ds.data.records.checks import LineLimit
from lumina_ds.data.records.reader import sample_texts
from lumina_ds.data.records.sources import check_input_files, parse_train_data, record_format_of
from lumina_ds.errors import ConfigError
from lumina_ds.tokenizer import ChatTokenizer

__all__ = [
    "Batching",
    "DataWorld",
    "LoaderRate",
    "PackedBatches",
    "PackedDataset",
    "TrainData",
    "build_train_data",
    "check_input_files",
    "measure_batches",
    "training_texts",
]


@dataclass(frozen=True)
class Batching:
    """How the rows are cut and batched, and how much of the data one run trains on."""

    seq_len: int
    micro_batch_size: int
    grad_accum: int
    seed: int
    epochs: int
    max_steps: int | None = None


@dataclass(frozen=True)
class DataWorld:
    """This process's place among the ranks, and the collectives data preparation needs (all no-ops in one process).

    `least_free_ram(bytes)` returns the smallest value over ranks (every rank must choose the same strategy);
    `shared(path)` says whether every rank sees the same directory (collective); `all_gather(value)` returns every
    rank's small picklable value in rank order (collective), with which the ranks share out data preparation."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    barrier: Callable[[], None] = lambda: None
    least_free_ram: Callable[[int], int] = lambda free: free
    shared: Callable[[Path], bool] = lambda _path: True
    log: Callable[[str], None] = print
    all_gather: Callable[[Any], list[Any]] | None = None  # None: every rank prepares alone (no division)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class TrainData:
    batches: PackedBatches  # this rank's micro-batches in the global resumable order
    eval_data: PackedDataset | None
    total_steps: int
    description: str  # one line for the run's start


def training_texts(data: DataConfig, *, max_bytes: int) -> Iterator[str]:
    """Message contents of the training sources, in order, up to about `max_bytes`: what a new BPE learns from."""
    assert data.train_data is not None
    locations = [spec.source.location for spec in parse_train_data(data.train_data)]
    return sample_texts(locations, max_bytes=max_bytes, limit=LineLimit(record_format=record_format_of(data)))


def encode_settings(data: DataConfig, tokenizer: ChatTokenizer) -> EncodeSettings:
    return EncodeSettings.of(tokenizer, train_on=data.train_on, strict=data.strict, max_line_bytes=data.max_line_bytes,
                             truncate_long=data.truncate_long, record_format=record_format_of(data))  # fmt: skip


def build_train_data(
    data: DataConfig, tokenizer: ChatTokenizer, batching: Batching, *, prepared_dir: Path, world: DataWorld
) -> TrainData:
    """Tokenize or open every training source with the strategy their size asks for, then this rank's batches, the
    evaluation rows and the optimizer steps. Every rank calls it: the ranks share out the preparation (each hashes,
    scans, counts or tokenizes a share of the bytes) through `world.all_gather`."""
    assert data.train_data is not None
    encode = encode_settings(data, tokenizer)
    sources = open_sources(
        parse_train_data(data.train_data),
        encode,
        data,
        prepared_dir=prepared_dir,
        team=preparing_team(prepared_dir, world),
        local_world_size=world.local_world_size,
        is_local_main=world.local_rank == 0,
        available_ram=world.least_free_ram(psutil.virtual_memory().available),
    )
    if world.is_main:
        world.log(f"data strategy: {sources.strategy} ({sources.reason})")
    for report in sources.reports:
        _report(report, world)
    batches = build_batches(sources, seed=batching.seed, rank=world.rank, world_size=world.world_size,
                            seq_len=batching.seq_len, pad_id=tokenizer.pad_id,
                            micro_batch_size=batching.micro_batch_size, data=data)  # fmt: skip
    eval_data = None
    if data.eval_data:
        rows, report = eval_rows(data.eval_data, encode, seq_len=batching.seq_len, pad_id=tokenizer.pad_id)
        _report_skipped(report, world)
        eval_data = PackedDataset(rows)
    total_steps, steps_text = _total_steps(batching, sources, batches, world)
    files = ", ".join(f"{spec.source.stem} x{spec.weight:g}" for spec in sources.specs)
    description = f"{files} | {batches.view.mixture.docs_per_epoch:,} lines/epoch | {steps_text}"
    return TrainData(batches=batches, eval_data=eval_data, total_steps=total_steps, description=description)


def preparing_team(prepared_dir: Path, world: DataWorld) -> Team:
    """The ranks that prepare the data in `prepared_dir` together: every rank when every rank sees that directory,
    else the ranks of each node (node-local disks each need their copy; ranks are numbered node by node, as the
    launchers do). Collective."""
    if world.local_rank == 0:
        prepared_dir.mkdir(parents=True, exist_ok=True)
    shared = world.shared(prepared_dir)
    if world.all_gather is None:
        return SOLO
    nodes = world.all_gather(world.rank - world.local_rank)  # a node's first rank names it
    if not shared and world.is_main:
        world.log(f"{prepared_dir} is not shared by every node: the ranks of each node prepare their own copy")
    return team_of(world.rank, nodes, shared=shared, all_gather=world.all_gather)


def shard_builder(prepared_dir: Path, world: DataWorld) -> bool:
    """Whether this rank builds missing prepared shards: global rank 0 when every rank sees the same directory (one
    build for the job), else local rank 0 of each node (node-local disks each need their copy). Collective."""
    if world.local_rank == 0:
        prepared_dir.mkdir(parents=True, exist_ok=True)
    if world.shared(prepared_dir):
        return world.rank == 0
    if world.is_main:
        world.log(f"{prepared_dir} is not shared by every node: local rank 0 of each node prepares its own shards")
    return world.local_rank == 0


def _total_steps(batching: Batching, sources: SourceSet, batches: PackedBatches, world: DataWorld) -> tuple[int, str]:
    """Optimizer steps: max_steps, or the epochs' global rows over the global batch."""
    if batching.max_steps is not None:
        return batching.max_steps, f"{batching.max_steps} steps"
    micro = micro_batches_for_epochs(sources, batches.view.mixture, epochs=batching.epochs,
                                     world_size=world.world_size, seq_len=batching.seq_len,
                                     micro_batch_size=batching.micro_batch_size)  # fmt: skip
    steps = micro // batching.grad_accum
    if steps < 1:
        raise ConfigError(
            "E002", "the training data does not fill one optimizer step", "lower --grad-accum or --batch-size"
        )
    return steps, f"{batching.epochs} epoch(s) = {steps} steps"


def _report(report: PrepareReport, world: DataWorld) -> None:
    if world.is_main:
        world.log(report.summary())
    _report_skipped(report, world)


def _report_skipped(report: PrepareReport, world: DataWorld) -> None:
    if report.skipped and world.is_main:
        shown = ", ".join(f"line {s.line_no} ({s.code}: {s.reason})" for s in report.skipped_examples[:5])
        more = f" and {report.skipped - 5} more" if report.skipped > 5 else ""
        print(f"{report.source}: skipped {report.skipped} malformed line(s): {shown}{more}", file=sys.stderr,
              flush=True)  # fmt: skip
