"""Token counts of streamed sources, taken once before training and cached beside the prepared shards.

Rows are ordered globally (data/global_order.py), so every rank must know where every row starts, which takes every
conversation's length. Tokenized sources know their lengths; a streamed file learns them only by tokenizing, and each
rank tokenizing every line would multiply that work by the number of ranks. So the ranks that share a cache directory
(data/prepare/team.py) each count a consecutive share of the records' bytes once (with the loader workers), the
counts are exchanged and cached (4 bytes per line), and a later run reads them; training then tokenizes each rank's
own rows only.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lumina_ds.data.prepare.content import temp_path
from lumina_ds.data.prepare.documents import JsonlDocs, TableDocs
from lumina_ds.data.prepare.team import SOLO, Team, checked, exchange, together
from lumina_ds.data.prepare.tokenize import MAX_REPORTED_SKIPS, EncodeSettings, PrepareReport, cache_key
from lumina_ds.data.records.sources import SourceSpec
from lumina_ds.data.records.types import SkippedLine
from lumina_ds.errors import DataError

COUNTS_DIR = "token-counts"
LINES_PER_TASK = 2048
Counted = tuple[int, np.ndarray, list[SkippedLine]]  # (first line index, tokens per line, skipped lines)
Streamed = JsonlDocs | TableDocs  # a source read on demand: JSONL lines by offset, table rows by index


@dataclass
class CountReport(PrepareReport):
    """What counting one streamed source found (lines, conversations, tokens, skipped lines)."""

    def summary(self) -> str:
        how = "token counts reused" if self.cached else f"counted in {self.seconds:.1f}s"
        return (
            f"{self.source}: {self.conversations:,} conversations, {self.tokens:,} tokens, "
            f"{self.skipped} line(s) skipped ({how}; streamed)"
        )


class _CountTasks(IterableDataset[Counted]):
    """Worker w of W counts line ranges k with k % W == w of the lines [lo, hi); the loader returns them in order."""

    def __init__(self, source: Streamed, lo: int, hi: int) -> None:
        self.source, self.lo, self.hi = source, lo, hi

    def __iter__(self) -> Iterator[Counted]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for first in range(self.lo + worker * LINES_PER_TASK, self.hi, workers * LINES_PER_TASK):
            items = self.source.fetch(range(first, min(first + LINES_PER_TASK, self.hi)))
            counts = np.array([len(item[0]) if isinstance(item, tuple) else 0 for item in items], dtype=np.int32)
            yield first, counts, [item for item in items if isinstance(item, SkippedLine)]


def _keep(item: Any) -> Any:
    return item


@dataclass
class _Counted:
    """Token counts of the lines [lo, hi) of a source, with the lines skipped (the first MAX_REPORTED_SKIPS)."""

    counts: np.ndarray
    skipped: int = 0
    examples: list[SkippedLine] = field(default_factory=list)


def _count_range(source: Streamed, lo: int, hi: int, *, num_workers: int, strict: bool) -> _Counted:
    """Tokenize the records [lo, hi) once (in `num_workers` processes); strict: stop at the first skipped one."""
    done = _Counted(np.zeros(hi - lo, dtype=np.int32))
    results: Any = _CountTasks(source, lo, hi)
    if num_workers > 0 and hi > lo:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers must not reuse tokenizer threads
        results = DataLoader(results, batch_size=None, num_workers=num_workers, collate_fn=_keep)
    for first, part, skipped in results:
        done.counts[first - lo : first - lo + len(part)] = part
        done.skipped += len(skipped)
        room = MAX_REPORTED_SKIPS - len(done.examples)
        done.examples.extend(skipped[: max(room, 0)])
        if skipped and strict:
            break
    return done


def _strict_error(source: Streamed, line: SkippedLine) -> DataError:
    unit = "row" if isinstance(source, TableDocs) else "line"
    hint = f"fix the {unit} or drop --strict to skip it"
    return DataError(line.code, f"{source.name} {unit} {line.line_no}: {line.reason}", hint)


def _size(source: Streamed) -> int:
    return source.nbytes if isinstance(source, TableDocs) else source.path.stat().st_size


def _report(source: Streamed, parts: Sequence[_Counted], started: float) -> CountReport:
    """The report of a source counted in consecutive parts (sets `source.lengths`)."""
    counts = np.concatenate([p.counts for p in parts]) if parts else np.zeros(0, np.int32)
    report = CountReport(source=source.name, bytes=_size(source), lines=len(counts))
    report.skipped = sum(p.skipped for p in parts)
    report.skipped_examples = [line for p in parts for line in p.examples][:MAX_REPORTED_SKIPS]
    report.conversations = int((counts > 0).sum())
    report.tokens = int(counts.sum(dtype=np.int64))
    report.seconds = time.perf_counter() - started
    source.lengths = counts
    return report


def count_tokens(source: Streamed, *, num_workers: int = 0, strict: bool = False) -> CountReport:
    """Tokenize every record of `source` once (in `num_workers` processes) and set `source.lengths`."""
    started = time.perf_counter()
    counted = _count_range(source, 0, len(source), num_workers=num_workers, strict=strict)
    if counted.examples and strict:
        raise _strict_error(source, counted.examples[0])
    return _report(source, [counted], started)


def _cache_files(
    spec: SourceSpec, settings: EncodeSettings, prepared_dir: Path, content: str | None
) -> tuple[Path, Path]:
    key = cache_key(spec.source, settings, memo_dir=prepared_dir, content=content)
    base = prepared_dir / COUNTS_DIR / f"{spec.source.stem}-{key}"
    return base.with_suffix(".npy"), base.with_suffix(".json")


def _save(counts_file: Path, meta_file: Path, report: CountReport, counts: np.ndarray) -> None:
    counts_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(counts_file)
    with tmp.open("wb") as handle:
        np.save(handle, counts)
    os.replace(tmp, counts_file)
    meta = {k: getattr(report, k) for k in ("lines", "conversations", "tokens", "skipped", "bytes")}
    meta["skipped_examples"] = [[s.line_no, s.code, s.reason] for s in report.skipped_examples]
    tmp = temp_path(meta_file)
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, meta_file)  # last: the counts are complete once their meta exists


def _load(source: Streamed, counts_file: Path, meta_file: Path) -> CountReport:
    meta = json.loads(meta_file.read_text())
    counts = np.load(counts_file)
    if len(counts) != len(source) or int(counts.sum(dtype=np.int64)) != meta["tokens"]:
        raise DataError("E109", f"token counts {counts_file} do not match {source.name}", f"delete {counts_file}")
    examples = [SkippedLine(*item) for item in meta.pop("skipped_examples")]
    source.lengths = counts
    return CountReport(source=source.name, cached=True, skipped_examples=examples, **meta)


def _spans(source: Streamed) -> np.ndarray:
    """Where each record starts [n + 1], in bytes (a table's estimated) plus one per record, so that every record
    has a weight and an empty source still divides."""
    n = len(source)
    starts = source.offsets if isinstance(source, JsonlDocs) else np.linspace(0, source.nbytes, n + 1).astype(np.int64)
    return np.asarray(starts, dtype=np.int64) + np.arange(n + 1, dtype=np.int64)


def shares(spans: Sequence[np.ndarray], size: int, rank: int) -> list[tuple[int, int]]:
    """Member `rank`'s records [lo, hi) of each source: those whose start falls in its share of all their bytes."""
    bases = np.concatenate([[0], np.cumsum([int(s[-1]) for s in spans], dtype=np.int64)])
    total = int(bases[-1])
    lo, hi = total * rank // size, total * (rank + 1) // size
    ranges = []
    for base, span in zip(bases.tolist(), spans, strict=False):
        starts = span[:-1] + base
        ranges.append((int(np.searchsorted(starts, lo)), int(np.searchsorted(starts, hi))))
    return ranges


def counted_sources(
    specs: Sequence[SourceSpec],
    sources: Sequence[Streamed],
    settings: EncodeSettings,
    *,
    prepared_dir: Path,
    team: Team = SOLO,
    contents: Sequence[str | None] | None = None,
    num_workers: int = 0,
) -> list[CountReport]:
    """Token counts of every streamed source: from the cache, else each member of the team counts its share of the
    records, the counts are exchanged and the writer caches them. A bad record under --strict is the same error on
    every rank. Collective."""
    files = [
        _cache_files(spec, settings, prepared_dir, (contents or [None] * len(specs))[i]) for i, spec in enumerate(specs)
    ]
    cached = team.agree(lambda: [meta.is_file() for _, meta in files])
    todo = [i for i, hit in enumerate(cached) if not hit]
    spans = [_spans(sources[i]) for i in todo]
    started = time.perf_counter()
    mine = shares(spans, team.size, team.rank)
    counted = checked(team, lambda: [_count_range(sources[i], lo, hi, num_workers=num_workers, strict=settings.strict)
                                     for i, (lo, hi) in zip(todo, mine, strict=True)])  # fmt: skip
    summaries = together(team, lambda: [(c.skipped, c.examples) for c in counted])
    packed = exchange(team, prepared_dir, [np.concatenate([c.counts for c in counted] or [np.zeros(0, np.int32)])])

    def finish() -> list[CountReport]:
        ranges = [shares(spans, team.size, member) for member in range(team.size)]
        reports = {i: _assembled(sources[i], j, ranges, summaries, packed, settings.strict, started)
                   for j, i in enumerate(todo)}  # fmt: skip
        if team.writer:
            for i, report in reports.items():
                _save(*files[i], report, report_lengths(sources[i]))
        return [reports[i] if i in reports else _load(sources[i], *files[i]) for i in range(len(sources))]

    return checked(team, finish)  # a bad line under --strict: every rank of the job raises its error


def report_lengths(source: Streamed) -> np.ndarray:
    assert source.lengths is not None
    return source.lengths


def _assembled(
    source: Streamed,
    j: int,
    ranges: Sequence[Sequence[tuple[int, int]]],
    summaries: Sequence[list[tuple[int, list[SkippedLine]]]],
    packed: Sequence[list[np.ndarray]],
    strict: bool,
    started: float,
) -> CountReport:
    """The report of the j-th counted source from every member's part (`ranges[member][j]`), in order (sets
    `source.lengths`)."""
    parts = []
    for member, ((array,), summary) in enumerate(zip(packed, summaries, strict=True)):
        first = sum(hi - lo for lo, hi in ranges[member][:j])  # the member's parts of the sources before
        lo, hi = ranges[member][j]
        skipped, examples = summary[j]
        parts.append(_Counted(array[first : first + hi - lo], skipped, examples))
    report = _report(source, parts, started)
    if strict and report.skipped_examples:
        raise _strict_error(source, report.skipped_examples[0])
    return report
