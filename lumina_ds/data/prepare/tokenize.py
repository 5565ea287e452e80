"""Tokenize data sources into token parts, in parallel worker processes, in RAM or as memory-mapped shards on disk.

Prepared shards live in `<prepared_dir>/<stem>-<key>/`, where the key hashes the source's content, the tokenizer,
the template settings and a non-default record format: a second run with the same inputs reuses them, a changed file
or tokenizer builds new ones.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import shutil
import socket
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import numpy as np
import psutil

from lumina_ds.config.run import MAX_LINE_BYTES
from lumina_ds.data.prepare import meter
from lumina_ds.data.prepare.content import source_content, temp_path, write_json_atomic
from lumina_ds.data.prepare.documents import DocEncoder, TokenizedDocs, TokenizedPart, token_dtype
from lumina_ds.data.records.checks import LineLimit, RawRecord
from lumina_ds.data.records.files import LongLine, is_gzip, iter_lines, read_line, reading, skip_line
from lumina_ds.data.records.formats import AUTO, RecordFormat, Row
from lumina_ds.data.records.sources import (
    DataSource,
    OpenSource,
    open_source,
    parse_source,
    source_bytes,
)
from lumina_ds.data.records.types import SkippedLine
from lumina_ds.errors import DataError
from lumina_ds.tokenizer import ChatTokenizer

FORMAT_VERSION = 2  # 2: a message's header newline and content are tokenized as one text
META_FILE = "meta.json"
LINES_PER_CHUNK = 512  # lines per tokenizer call: large enough to amortise, small enough to stay cache-friendly
MAX_REPORTED_SKIPS = 20
IN_PROCESS_BYTES = 8 << 20  # below this, worker start-up costs more than it saves
GZIP_TASK_BYTES = 64 << 20  # decompressed JSONL per task of a .gz: (workers + 1) tasks are in memory at once


@dataclass(frozen=True)
class EncodeSettings:
    """Everything that decides a source's tokens (part of the cache key)."""

    tokenizer_json: str
    train_on: str = "assistant"
    strict: bool = False
    max_line_bytes: int = MAX_LINE_BYTES
    truncate_long: bool = False
    record_format: RecordFormat = AUTO  # --data-format/--data-fields; a source's own once it is opened

    @property
    def limit(self) -> LineLimit:
        return LineLimit(self.max_line_bytes, self.truncate_long, self.record_format)

    def for_source(self, opened: OpenSource) -> EncodeSettings:
        """These settings with the record format decided for one source."""
        return replace(self, record_format=opened.record_format)

    def encoder(self) -> DocEncoder:
        tokenizer = ChatTokenizer.from_str(self.tokenizer_json)  # with its chat template, if any
        return DocEncoder(tokenizer, train_on=self.train_on, limit=self.limit)

    @classmethod
    def of(
        cls,
        tokenizer: ChatTokenizer,
        *,
        train_on: str = "assistant",
        strict: bool = False,
        max_line_bytes: int = MAX_LINE_BYTES,
        truncate_long: bool = False,
        record_format: RecordFormat = AUTO,
    ) -> EncodeSettings:
        return cls(tokenizer.to_str(), train_on, strict, max_line_bytes, truncate_long, record_format)


@dataclass
class PrepareReport:
    """What tokenizing one source found."""

    source: str
    lines: int = 0
    conversations: int = 0
    tokens: int = 0
    skipped: int = 0
    skipped_examples: list[SkippedLine] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    cached: bool = False
    directory: str = ""  # where the prepared shards are (sharded strategy)

    def summary(self) -> str:
        speed = self.bytes / 1e6 / max(self.seconds, 1e-9)
        how = "reused prepared shards" if self.cached else f"{self.seconds:.1f}s, {speed:.1f} MB/s"
        return (
            f"{self.source}: {self.conversations:,} conversations, {self.tokens:,} tokens, "
            f"{self.skipped} line(s) skipped ({how})"
        )


@dataclass
class _Task:
    path: str
    start: int
    stop: int
    settings: EncodeSettings
    out_prefix: str | None  # write the part here (sharded) instead of returning arrays
    lines: list[RawRecord] | None = None  # a .gz chunk or a table's rows, read by the main process (start/stop: bytes)
    unit: str = "line"  # what the source's record numbers count, for errors


@dataclass
class _TaskResult:
    lines: int
    lengths: np.ndarray
    tokens: np.ndarray | None
    targets: np.ndarray | None
    skipped: int
    skipped_examples: list[tuple[int, str, str]]  # (line index within the range, code, reason)
    first_error: tuple[int, str, str] | None


def byte_ranges(path: Path, *, target_bytes: int, start: int = 0, stop: int | None = None) -> list[tuple[int, int]]:
    """Split a file (or its bytes [start, stop), both line starts) into ranges of about `target_bytes`, each starting
    at a line start."""
    size = path.stat().st_size if stop is None else stop
    bounds = [start]
    with path.open("rb") as handle:
        while bounds[-1] + target_bytes < size:
            handle.seek(bounds[-1] + target_bytes)
            skip_line(handle)  # move to the next line start
            if handle.tell() >= size:
                break
            bounds.append(handle.tell())
    bounds.append(size)
    return list(itertools.pairwise(bounds))


def line_start_at(path: Path, position: int) -> int:
    """The first line start at or after byte `position` of a file (its size past the last line)."""
    size = path.stat().st_size
    if position <= 0 or position >= size:
        return min(max(position, 0), size)
    with path.open("rb") as handle:
        handle.seek(position - 1)  # a line starts at `position` when the byte before it ends a line
        skip_line(handle)
        return min(handle.tell(), size)


def _task_lines(task: _Task) -> Iterator[RawRecord]:
    """The task's lines: its .gz chunk or rows, or its byte range read a bounded line at a time."""
    if task.lines is not None:
        yield from task.lines
        return
    limit = task.settings.limit
    with open(task.path, "rb") as handle:
        handle.seek(task.start)
        while handle.tell() < task.stop and (raw := read_line(handle, max_bytes=limit.max_bytes, whole=limit.truncate)):
            yield raw


def _gzip_tasks(
    path: Path, settings: EncodeSettings, *, target_bytes: int, out_dir: Path | None, tag: str = ""
) -> Iterator[_Task]:
    """Consecutive chunks of about `target_bytes` of a .gz file's lines: it can only be read from the start."""
    limit = settings.limit
    lines: list[RawRecord] = []
    start = stop = index = 0
    with reading(path) as handle:
        for raw in itertools.chain(iter_lines(handle, max_bytes=limit.max_bytes, whole=limit.truncate), [None]):
            if raw is not None:
                lines.append(raw)
                stop += raw.size + 1 if isinstance(raw, LongLine) else len(raw)
                if stop - start < target_bytes:
                    continue
            if lines or index == 0:
                prefix = str(out_dir / f"part-{tag}{index:05d}") if out_dir else None
                yield _Task(str(path), start, stop, settings, prefix, lines)
            lines, start, index = [], stop, index + 1


def _encode_range(task: _Task, first_line_no: int) -> _TaskResult:
    encoder = task.settings.encoder()
    dtype = token_dtype(encoder.tokenizer.vocab_size)
    lengths: list[int] = []
    tokens: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    skipped, first_error = 0, None
    examples: list[tuple[int, str, str]] = []
    chunk: list[tuple[int, RawRecord]] = []
    for raw in itertools.chain(_task_lines(task), [None]):
        if raw is not None:
            # line numbers matter only for BOM handling here (line 1); reports use the range-local index
            chunk.append((first_line_no + len(lengths) + len(chunk), raw))
            if len(chunk) < LINES_PER_CHUNK:
                continue
        for item in encoder.encode_lines(chunk):
            if isinstance(item, SkippedLine):
                skipped += 1
                local = (len(lengths), item.code, item.reason)
                first_error = first_error or local
                if len(examples) < MAX_REPORTED_SKIPS:
                    examples.append(local)
            if isinstance(item, tuple):
                tokens.append(item[0].astype(dtype))
                targets.append(item[1])
            lengths.append(len(item[0]) if isinstance(item, tuple) else 0)
        chunk = []
        if first_error and task.settings.strict:
            break
    return _TaskResult(
        lines=len(lengths),
        lengths=np.asarray(lengths, dtype=np.int64),
        tokens=np.concatenate(tokens) if tokens else np.zeros(0, dtype),
        targets=np.concatenate(targets) if targets else np.zeros(0, np.uint8),
        skipped=skipped,
        skipped_examples=examples,
        first_error=first_error,
    )


def _run_task(task: _Task) -> _TaskResult:
    """Worker entry: tokenize one range; with `out_prefix`, write it as a shard and return only its lengths."""
    result = _encode_range(task, first_line_no=1 if task.start == 0 else 2)
    if task.out_prefix is not None:
        assert result.tokens is not None and result.targets is not None
        np.save(task.out_prefix + ".tokens.npy", result.tokens)
        np.save(task.out_prefix + ".targets.npy", result.targets)
        np.save(task.out_prefix + ".lengths.npy", result.lengths)
        result.tokens = result.targets = None
    return result


def _results(tasks: Iterable[_Task], num_workers: int) -> Iterator[tuple[_Task, _TaskResult]]:
    """Tasks with their results, in order; in worker processes (spawned: no inherited threads or CUDA) when
    `num_workers` > 1, with at most `num_workers + 1` tasks in flight (a .gz task holds its lines)."""
    if num_workers <= 1:
        for task in tasks:
            meter.read(task.stop - task.start)
            yield task, _run_task(task)
            task.lines = None
        return
    with ProcessPoolExecutor(max_workers=num_workers, mp_context=get_context("spawn")) as pool:
        pending: deque[tuple[_Task, Future[_TaskResult]]] = deque()
        for item in itertools.chain(tasks, [None]):
            if item is not None:
                pending.append((item, pool.submit(_run_task, item)))
            while pending and (item is None or len(pending) > num_workers):
                done, future = pending.popleft()
                done.lines, result = None, future.result()
                meter.read(done.stop - done.start)
                meter.encoded(int(result.lengths.sum()))  # the worker's own counters do not come back
                yield done, result


def _progress(total_bytes: int, label: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        desc=f"tokenizing {label}",
        disable=not enabled or total_bytes < IN_PROCESS_BYTES,
        file=sys.stderr,
    )


def _collect(results: Iterator[tuple[_Task, _TaskResult]], report: PrepareReport, bar: Any) -> list[_TaskResult]:
    done: list[_TaskResult] = []
    started = time.perf_counter()
    report.bytes = 0
    for task, result in results:
        report.bytes += task.stop - task.start
        first_line = report.lines + 1
        report.lines += result.lines
        report.skipped += result.skipped
        report.conversations += int((result.lengths > 0).sum())
        report.tokens += int(result.lengths.sum())
        for local, code, reason in result.skipped_examples:
            if len(report.skipped_examples) < MAX_REPORTED_SKIPS:
                report.skipped_examples.append(SkippedLine(first_line + local, code, reason))
        if result.first_error and task.settings.strict:
            local, code, reason = result.first_error
            where = f"{task.path} {task.unit} {first_line + local}"
            raise DataError(code, f"{where}: {reason}", f"fix the {task.unit} or drop --strict to skip it")
        done.append(result)
        bar.update(task.stop - task.start)
        bar.set_postfix(conv_s=f"{report.conversations / max(time.perf_counter() - started, 1e-9):,.0f}")
    return done


def tokenize_source(
    location: str | Path | DataSource,
    settings: EncodeSettings,
    *,
    num_workers: int = 1,
    shard_bytes: int = 256 << 20,
    out_dir: Path | None = None,
    progress: bool = False,
) -> tuple[TokenizedDocs, PrepareReport]:
    """Tokenize a source into RAM, or (with `out_dir`) into memory-mapped shards there. Workers read byte ranges of a
    plain JSONL file themselves; a .gz is decompressed here, and a table's rows read here, in chunks handed to them."""
    started = time.perf_counter()
    opened = open_source(location, settings.record_format)
    settings, source = settings.for_source(opened), opened.source
    size = source_bytes(source)  # estimated for a .gz
    # enough ranges to keep every worker busy and the progress bar moving
    target = min(shard_bytes, max(1 << 20, size // max(4 * num_workers, 1) + 1))
    tasks: Iterable[_Task]
    if opened.table is not None:
        tasks = _table_tasks(opened, settings, target_bytes=min(target, GZIP_TASK_BYTES), out_dir=out_dir)
    elif is_gzip(source.local):
        tasks = _gzip_tasks(source.local, settings, target_bytes=min(target, GZIP_TASK_BYTES), out_dir=out_dir)
    else:
        path = source.local
        ranges = byte_ranges(path, target_bytes=target) if size else [(0, 0)]
        prefixes = [str(out_dir / f"part-{i:05d}") if out_dir else None for i in range(len(ranges))]
        tasks = [_Task(str(path), a, b, settings, prefix) for (a, b), prefix in zip(ranges, prefixes, strict=True)]
    workers = 1 if size < IN_PROCESS_BYTES or size <= target else num_workers
    report = PrepareReport(source=str(source))
    with _progress(size, source.stem, progress) as bar:
        results = _collect(_results(tasks, workers), report, bar)
    report.seconds = time.perf_counter() - started
    if out_dir is not None:
        return open_shards(out_dir, name=str(source)), report
    parts = [_part(r.tokens, r.targets, r.lengths) for r in results]
    return TokenizedDocs(str(source), parts), report


def _table_tasks(
    opened: OpenSource,
    settings: EncodeSettings,
    *,
    target_bytes: int,
    out_dir: Path | None,
    rows: tuple[int, int] | None = None,
    tag: str = "",
) -> Iterator[_Task]:
    """Consecutive chunks of about `target_bytes` of a table's rows (all, or `rows` [first, last)), read here
    (start/stop: estimated bytes)."""
    table = opened.table
    assert table is not None
    total = len(table)
    begin, end = rows if rows is not None else (0, total)
    per_task = max(1, total * target_bytes // max(table.nbytes, 1))
    for index, first in enumerate(range(begin, max(end, begin + (rows is None)), per_task)):
        last = min(first + per_task, end)
        records: list[RawRecord] = [Row(r) for r in table.read(first, last)]
        prefix = str(out_dir / f"part-{tag}{index:05d}") if out_dir else None
        start, stop = table.nbytes * first // max(total, 1), table.nbytes * last // max(total, 1)
        yield _Task(str(opened.source), start, stop, settings, prefix, records, unit="row")


def _part(tokens: np.ndarray | None, targets: np.ndarray | None, lengths: np.ndarray) -> TokenizedPart:
    assert tokens is not None and targets is not None
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    assert offsets[-1] == len(tokens) == len(targets)
    return TokenizedPart(tokens=tokens, targets=targets, offsets=offsets)


def open_shards(directory: Path, *, name: str, in_memory: bool = False) -> TokenizedDocs:
    """Memory-map (or read into RAM) the parts of a prepared directory; E109 if a file is missing or inconsistent."""
    parts = []
    for lengths_file in sorted(directory.glob("part-*.lengths.npy")):
        prefix = str(lengths_file)[: -len(".lengths.npy")]
        try:
            lengths = np.load(lengths_file)
            mode: Literal["r"] | None = None if in_memory else "r"
            tokens = np.load(prefix + ".tokens.npy", mmap_mode=mode)
            targets = np.load(prefix + ".targets.npy", mmap_mode=mode)
            parts.append(_part(tokens, targets, lengths))
        except (OSError, ValueError, AssertionError) as exc:
            raise DataError(
                "E109",
                f"prepared shard {prefix} is unreadable or inconsistent: {exc}",
                f"delete {directory} and prepare again (lumina-ds prepare-data)",
            ) from exc
    return TokenizedDocs(name, parts)


def cache_key(
    location: str | Path | DataSource,
    settings: EncodeSettings,
    *,
    memo_dir: Path | None = None,
    content: str | None = None,
) -> str:
    """Key of a prepared source: its content (the compressed bytes of a .gz, a table's files), the tokenizer, the
    template settings, the line limit, a non-default record format and the format version. `content`: the source's
    content hash when it is known already (data/prepare/survey.py)."""
    digest = hashlib.blake2b(digest_size=8)
    limit = f"{settings.max_line_bytes}:{settings.truncate_long}"
    content = source_content(location, memo_dir=memo_dir) if content is None else content
    for piece in (content, settings.tokenizer_json, settings.train_on, limit):
        digest.update(piece.encode())
    fmt = settings.record_format
    if not fmt.plain:  # keys of plain messages sources stay those of before formats existed
        digest.update(f"{fmt.name}:{fmt.fields}".encode())
    digest.update(str(FORMAT_VERSION).encode())
    return digest.hexdigest()


def prepare_source(
    location: str | Path | DataSource,
    settings: EncodeSettings,
    *,
    prepared_dir: Path,
    num_workers: int = 1,
    shard_bytes: int = 256 << 20,
    progress: bool = False,
) -> tuple[TokenizedDocs, PrepareReport]:
    """Prepared shards of a source from the cache, built first when missing (atomically: temp dir, then rename)."""
    source = parse_source(location)
    try:
        prepared_dir.mkdir(parents=True, exist_ok=True)
        target = prepared_dir / f"{source.stem}-{cache_key(source, settings, memo_dir=prepared_dir)}"
        if (target / META_FILE).is_file():
            return _load_cached(target, source)
        return _build(source, settings, target, num_workers, shard_bytes, progress)
    except OSError as exc:
        hint = "free disk space or pass --prepared-dir on a larger disk" if exc.errno == errno.ENOSPC else ""
        raise DataError("E108", f"cannot write prepared shards under {prepared_dir}: {exc}", hint) from exc


def _load_cached(target: Path, source: DataSource) -> tuple[TokenizedDocs, PrepareReport]:
    meta = json.loads((target / META_FILE).read_text())
    report = PrepareReport(source=str(source), cached=True, bytes=int(meta["bytes"]))
    for key in ("lines", "conversations", "tokens", "skipped"):
        setattr(report, key, int(meta[key]))
    report.skipped_examples = [SkippedLine(*item) for item in meta["skipped_examples"]]
    report.directory = str(target)
    docs = open_shards(target, name=str(source))
    if len(docs) != report.lines or docs.num_tokens != report.tokens:
        raise DataError("E109", f"prepared shards in {target} do not match their meta.json", f"delete {target}")
    return docs, report


def _remove_abandoned_builds(target: Path) -> None:
    """Temp dirs of builds on this host whose process is gone (killed mid-build); other hosts' are left alone."""
    host = socket.gethostname()
    for tmp in target.parent.glob(f".{target.name}.{host}.*.tmp"):
        pid = tmp.name[: -len(".tmp")].rsplit(".", 2)[-2]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _build(
    source: DataSource, settings: EncodeSettings, target: Path, num_workers: int, shard_bytes: int, progress: bool
) -> tuple[TokenizedDocs, PrepareReport]:
    _remove_abandoned_builds(target)
    tmp = temp_path(target)
    tmp.mkdir(parents=True)
    try:
        _, report = tokenize_source(
            source, settings, num_workers=num_workers, shard_bytes=shard_bytes, out_dir=tmp, progress=progress
        )
        report.directory = str(target)
        skip = ("skipped_examples", "cached", "seconds", "directory")
        meta = {k: v for k, v in report.__dict__.items() if k not in skip}
        meta["skipped_examples"] = [[s.line_no, s.code, s.reason] for s in report.skipped_examples]
        meta["format_version"] = FORMAT_VERSION
        meta["train_on"] = settings.train_on
        write_json_atomic(tmp / META_FILE, meta)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / META_FILE).is_file():  # not another process winning the race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_shards(target, name=str(source)), report
