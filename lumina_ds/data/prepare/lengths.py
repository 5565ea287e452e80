"""Token counts of streamed sources, taken once before training and cached beside the prepared shards.

Rows are ordered globally (data/global_order.py), so every rank must know where every row starts, which takes every
conversation's length. Tokenized sources know their lengths; a streamed file learns them only by tokenizing, and each
rank tokenizing every line would multiply that work by the number of ranks. So one process per shared cache counts
them once (with the loader workers), stores 4 bytes per line, and every rank reads the counts; training then
tokenizes each rank's own rows only.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lumina_ds.data.prepare.content import temp_path
from lumina_ds.data.prepare.documents import JsonlDocs, TableDocs
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
    """Worker w of W counts line ranges k with k % W == w; the loader returns them in order."""

    def __init__(self, source: Streamed) -> None:
        self.source = source

    def __iter__(self) -> Iterator[Counted]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for first in range(worker * LINES_PER_TASK, len(self.source), workers * LINES_PER_TASK):
            items = self.source.fetch(range(first, min(first + LINES_PER_TASK, len(self.source))))
            counts = np.array([len(item[0]) if isinstance(item, tuple) else 0 for item in items], dtype=np.int32)
            yield first, counts, [item for item in items if isinstance(item, SkippedLine)]


def _keep(item: Any) -> Any:
    return item


def count_tokens(source: Streamed, *, num_workers: int = 0, strict: bool = False) -> CountReport:
    """Tokenize every record of `source` once (in `num_workers` processes) and set `source.lengths`."""
    started = time.perf_counter()
    size = source.nbytes if isinstance(source, TableDocs) else source.path.stat().st_size
    report = CountReport(source=source.name, bytes=size)
    counts = np.zeros(len(source), dtype=np.int32)
    tasks = _CountTasks(source)
    results: Any = tasks
    if num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers must not reuse tokenizer threads
        results = DataLoader(tasks, batch_size=None, num_workers=num_workers, collate_fn=_keep)
    for first, part, skipped in results:
        counts[first : first + len(part)] = part
        report.skipped += len(skipped)
        room = MAX_REPORTED_SKIPS - len(report.skipped_examples)
        report.skipped_examples.extend(skipped[: max(room, 0)])
        if skipped and strict:
            line, unit = skipped[0], "row" if isinstance(source, TableDocs) else "line"
            hint = f"fix the {unit} or drop --strict to skip it"
            raise DataError(line.code, f"{source.name} {unit} {line.line_no}: {line.reason}", hint)
    report.lines = len(counts)
    report.conversations = int((counts > 0).sum())
    report.tokens = int(counts.sum(dtype=np.int64))
    report.seconds = time.perf_counter() - started
    source.lengths = counts
    return report


def _cache_files(spec: SourceSpec, settings: EncodeSettings, prepared_dir: Path) -> tuple[Path, Path]:
    key = cache_key(spec.source, settings, memo_dir=prepared_dir)
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


def counted_sources(
    specs: Sequence[SourceSpec],
    sources: Sequence[Streamed],
    settings: EncodeSettings,
    *,
    prepared_dir: Path,
    builds: bool,
    barrier: Callable[[], None],
    num_workers: int = 0,
) -> list[CountReport]:
    """Token counts of every streamed source: from the cache, else counted by the building process while the others
    wait; a rank that finds no counts after the barrier stops with E109 (the builder names the real problem)."""
    files = [_cache_files(spec, settings, prepared_dir) for spec in specs]
    fresh: dict[int, CountReport] = {}
    problem: DataError | None = None
    if builds:
        try:
            for i, (source, (counts_file, meta_file)) in enumerate(zip(sources, files, strict=True)):
                if not meta_file.is_file():
                    fresh[i] = count_tokens(source, num_workers=num_workers, strict=settings.strict)
                    assert source.lengths is not None
                    _save(counts_file, meta_file, fresh[i], source.lengths)
        except DataError as exc:
            problem = exc  # raised after the barrier, so the waiting ranks are not left behind
    barrier()
    if problem is not None:
        raise problem
    reports = []
    for i, (source, (counts_file, meta_file)) in enumerate(zip(sources, files, strict=True)):
        if i in fresh:
            reports.append(fresh[i])
            continue
        if not meta_file.is_file():
            hint = "the process that counts them failed: see its error above"
            raise DataError("E109", f"no token counts for {source.name} in {prepared_dir}", hint)
        reports.append(_load(source, counts_file, meta_file))
    return reports
