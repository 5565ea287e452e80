"""From `--train-data` to this rank's batches: strategy choice, tokenized or streamed sources, steps per epoch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from lumina_ds.batch import Batch
from lumina_ds.config.run import DATA_STRATEGIES, DataConfig
from lumina_ds.data.loading.global_order import GlobalRows
from lumina_ds.data.loading.mixture import Mixture
from lumina_ds.data.loading.packing import PackedRows
from lumina_ds.data.loading.stream import DocSource, PackedBatches, RankView, RowPacker
from lumina_ds.data.prepare.build import build_sources
from lumina_ds.data.prepare.content import source_content, source_files
from lumina_ds.data.prepare.documents import JsonlDocs, TableDocs
from lumina_ds.data.prepare.lengths import counted_sources
from lumina_ds.data.prepare.survey import Facts, survey
from lumina_ds.data.prepare.team import SOLO, Team
from lumina_ds.data.prepare.tokenize import EncodeSettings, PrepareReport, tokenize_source
from lumina_ds.data.records.files import is_gzip
from lumina_ds.data.records.sources import JSONL, DataSource, SourceSpec, open_source, parse_source, source_bytes
from lumina_ds.errors import ConfigError, DataError

MEMORY_LIMIT_BYTES = 500 * 10**6  # below: tokenize into RAM
STREAMING_LIMIT_BYTES = 10 * 10**9  # above: stream from the sources
RAM_BYTES_PER_INPUT_BYTE = 3.0  # tokenizing into RAM peaks near 3x the JSONL size (strings, lists, arrays)


def choose_strategy(total_bytes: int, *, requested: str, available_ram: int) -> tuple[str, str]:
    """(strategy, why): by size, and never into RAM when tokenizing would take more than half of what is free."""
    if requested not in DATA_STRATEGIES:
        raise ConfigError("E002", f"unknown data strategy {requested!r}", f"choose one of {DATA_STRATEGIES}")
    size = f"{total_bytes / 1e6:,.1f} MB of data"
    if requested != "auto":
        return requested, f"{size}, chosen by flag"
    if total_bytes >= STREAMING_LIMIT_BYTES:
        return "streaming", f"{size} >= 10 GB"
    needed = total_bytes * RAM_BYTES_PER_INPUT_BYTE
    if total_bytes < MEMORY_LIMIT_BYTES and needed < available_ram / 2:
        return "memory", f"{size} < 500 MB"
    if total_bytes < MEMORY_LIMIT_BYTES:
        return "sharded", f"{size}, but tokenizing into RAM would need {needed / 2**30:.1f} GiB of the free RAM"
    return "sharded", f"{size} between 500 MB and 10 GB"


@dataclass
class SourceSet:
    """Opened training sources and what tokenizing them reported."""

    specs: list[SourceSpec]
    sources: list[DocSource]
    reports: list[PrepareReport] = field(default_factory=list)
    strategy: str = "memory"
    reason: str = ""
    contents: list[str] = field(default_factory=list)  # each source's content hash (source_content)


def open_sources(
    specs: Sequence[SourceSpec],
    encode: EncodeSettings,
    data: DataConfig,
    *,
    prepared_dir: Path,
    team: Team = SOLO,
    local_world_size: int = 1,
    is_local_main: bool = True,
    available_ram: int | None = None,
) -> SourceSet:
    """Open every source with the chosen strategy. What the sources hold (content hashes, line offsets, token counts,
    shards) is found once: the ranks of `team` (those sharing `prepared_dir`) each do a share and the rest comes from
    the cache. `available_ram` must be the same on every rank (the least free RAM of any node), so that all ranks
    choose the same strategy and make the same collective calls. Collective."""
    total = sum(source_bytes(s.source) for s in specs)  # a .gz: its (estimated) JSONL size; a table: uncompressed
    ram = psutil.virtual_memory().available if available_ram is None else available_ram
    strategy, reason = choose_strategy(total, requested=data.strategy, available_ram=ram)
    result = SourceSet(list(specs), [], strategy=strategy, reason=reason)
    streaming = strategy == "streaming"
    offsets_of = {str(s.source.local) for s in specs if streaming and s.source.kind == JSONL and s.source.random_access}
    files = [path for spec in specs for path in source_files(spec.source)[0]]
    facts = survey(files, offsets_of, team, memo_dir=prepared_dir)
    # a checkpoint's data position is only valid on the same content (an edit in place keeps the line count)
    result.contents = [source_content(spec.source, known=facts.contents) for spec in specs]
    # the ranks of a node share its cores: together they start about num_workers processes
    workers = data.num_workers // max(local_world_size, 1)
    if streaming:
        _open_streamed(result, encode, data, prepared_dir, team, facts, workers)
    elif strategy == "memory" and team.world_size == 1:
        for spec in specs:
            docs, report = tokenize_source(spec.source, encode, num_workers=max(workers, 1), progress=is_local_main)
            result.sources.append(docs)
            result.reports.append(report)
    else:  # several ranks share out the tokenizing; with the memory strategy each then reads the shards into RAM
        built_list = build_sources(specs, encode, team, prepared_dir=prepared_dir, contents=result.contents,
                                   num_workers=max(workers, 1), shard_bytes=data.shard_size_mb << 20,
                                   in_memory=strategy == "memory")  # fmt: skip
        result.sources = [docs for docs, _ in built_list]
        result.reports = [report for _, report in built_list]
    return result


def _open_streamed(
    result: SourceSet,
    encode: EncodeSettings,
    data: DataConfig,
    prepared_dir: Path,
    team: Team,
    facts: Facts,
    workers: int,
) -> None:
    """Plain JSONL files and tables streamed, .gz files prepared as shards (gzip has no random access)."""
    specs = result.specs
    gzipped = [i for i, s in enumerate(specs) if not s.source.random_access]
    built = iter(build_sources([specs[i] for i in gzipped], encode, team, prepared_dir=prepared_dir,
                               contents=[result.contents[i] for i in gzipped], num_workers=max(workers, 1),
                               shard_bytes=data.shard_size_mb << 20))  # fmt: skip
    if gzipped:
        result.reason += "; .gz files prepared as shards (gzip has no random access)"
    for spec in specs:
        if spec.source.random_access:
            result.sources.append(streamed(spec.source, encode, facts))
            continue
        docs, report = next(built)
        result.sources.append(docs)
        result.reports.append(report)
    _count_streamed(result, encode, prepared_dir, team, workers)


def streamed(source: DataSource, encode: EncodeSettings, facts: Facts | None = None) -> JsonlDocs | TableDocs:
    """A source read on demand: a plain JSONL file by line offsets (surveyed in `facts`), a table by row index."""
    opened = open_source(source, encode.record_format)
    encoder = encode.for_source(opened).encoder()
    if opened.table is None:
        assert source.kind == JSONL and not is_gzip(source.local), source
        offsets = facts.offsets.get(str(source.local)) if facts is not None else None
        return JsonlDocs(source.local, encoder, offsets=offsets)
    return TableDocs(str(source), opened.table, encoder)


def _count_streamed(sources: SourceSet, encode: EncodeSettings, prepared_dir: Path, team: Team, workers: int) -> None:
    """Token counts of the streamed files (global row order needs every length), reported with the shards'."""
    on_demand = [i for i, s in enumerate(sources.sources) if isinstance(s, JsonlDocs | TableDocs)]
    docs = [s for s in sources.sources if isinstance(s, JsonlDocs | TableDocs)]
    counted = counted_sources([sources.specs[i] for i in on_demand], docs, encode, prepared_dir=prepared_dir,
                              team=team, contents=[sources.contents[i] for i in on_demand],
                              num_workers=workers)  # fmt: skip
    sources.reports = [*sources.reports, *counted]


def mixture_of(sources: SourceSet, *, seed: int) -> Mixture:
    return Mixture([len(s) for s in sources.sources], [s.weight for s in sources.specs], seed=seed)


def micro_batches_for_epochs(
    sources: SourceSet, mixture: Mixture, *, epochs: int, world_size: int, seq_len: int, micro_batch_size: int
) -> int:
    """Micro-batches every rank yields in `epochs` epochs: the global rows of those epochs over ranks x batch."""
    view = RankView(sources.sources, mixture, world_size=world_size)
    rows = GlobalRows(mixture, view.lengths(), seq_len=seq_len)
    return rows.total_rows(epochs) // (world_size * micro_batch_size)


def build_batches(
    sources: SourceSet,
    *,
    seed: int,
    rank: int,
    world_size: int,
    seq_len: int,
    pad_id: int,
    micro_batch_size: int,
    data: DataConfig,
) -> PackedBatches:
    """This rank's share of the global rows, resumable; loader workers only where documents are tokenized on the fly."""
    view = RankView(sources.sources, mixture_of(sources, seed=seed), rank=rank, world_size=world_size)
    workers = data.num_workers if sources.strategy == "streaming" else 0
    return PackedBatches(
        view,
        seq_len=seq_len,
        pad_id=pad_id,
        micro_batch_size=micro_batch_size,
        num_workers=workers,
        prefetch_factor=data.prefetch_factor,
        contents=[[str(spec.source), content] for spec, content in zip(sources.specs, sources.contents, strict=True)],
        allow_changed=data.allow_changed_data,
    )


def eval_rows(
    location: str | Path, encode: EncodeSettings, *, seq_len: int, pad_id: int
) -> tuple[PackedRows, PrepareReport]:
    """The evaluation source in its order, packed into rows once (it is small and read every evaluation)."""
    source = parse_source(location)
    docs, report = tokenize_source(source, encode)
    if report.conversations == 0:
        raise DataError(
            "E106",
            f"no usable conversations in {source} ({report.skipped} of {report.lines} {source.unit}s skipped)",
            f"Run `lumina-ds validate-data {source}` to see what is wrong.",
        )
    packer = RowPacker(seq_len=seq_len, pad_id=pad_id)
    rows = list(packer.rows(iter([(0, 0, docs.fetch(range(len(docs))))])))
    stacked = {key: np.stack([getattr(r, key) for r in rows]) for key in Batch._fields}
    return PackedRows(**stacked, num_conversations=report.conversations), report
