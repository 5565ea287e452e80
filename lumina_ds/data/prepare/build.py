"""Prepared shards built by every rank of a team at once: each tokenizes a consecutive share of every source (a
byte range of a JSONL file, a row range of a table; a .gz, which can only be read from its start, goes whole to one
member), writing its parts into one temp directory; the writer adds meta.json and renames it into the cache. The
shards are those one process builds (the same documents, tokens and report; only the part boundaries differ)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lumina_ds.data.prepare.content import temp_path, write_json_atomic
from lumina_ds.data.prepare.documents import TokenizedDocs
from lumina_ds.data.prepare.team import Team, checked, together
from lumina_ds.data.prepare.tokenize import (
    FORMAT_VERSION,
    IN_PROCESS_BYTES,
    MAX_REPORTED_SKIPS,
    META_FILE,
    EncodeSettings,
    PrepareReport,
    _gzip_tasks,
    _load_cached,
    _remove_abandoned_builds,
    _results,
    _table_tasks,
    _Task,
    byte_ranges,
    cache_key,
    line_start_at,
    open_shards,
)
from lumina_ds.data.records.files import is_gzip
from lumina_ds.data.records.sources import SourceSpec, open_source, source_bytes
from lumina_ds.data.records.types import SkippedLine
from lumina_ds.errors import DataError, LuminaError

Built = tuple[TokenizedDocs, PrepareReport]


@dataclass(frozen=True)
class _Plan:
    target: Path
    tmp: Path | None  # where the team builds it; None: in the cache already


@dataclass(frozen=True)
class _Done:
    """What one task of a member found (its line numbers are local to the task)."""

    source: int
    bytes: int
    lines: int
    conversations: int
    tokens: int
    skipped: int
    examples: list[tuple[int, str, str]]
    first_error: tuple[int, str, str] | None
    unit: str


def _plan(
    specs: Sequence[SourceSpec], settings: EncodeSettings, prepared_dir: Path, contents: Sequence[str]
) -> list[_Plan]:
    prepared_dir.mkdir(parents=True, exist_ok=True)
    plans = []
    for spec, content in zip(specs, contents, strict=True):
        target = prepared_dir / f"{spec.source.stem}-{cache_key(spec.source, settings, content=content)}"
        if (target / META_FILE).is_file():
            plans.append(_Plan(target, None))
            continue
        _remove_abandoned_builds(target)
        tmp = temp_path(target)
        tmp.mkdir(parents=True)
        plans.append(_Plan(target, tmp))
    return plans


def _gzip_owner(team: Team, specs: Sequence[SourceSpec], plans: Sequence[_Plan]) -> dict[int, int]:
    """Who builds each .gz to build: the largest first, each to the member with the fewest bytes so far."""
    gzipped = [i for i, p in enumerate(plans) if p.tmp and is_gzip(specs[i].source.location)]
    load = [0] * team.size
    owners = {}
    for i in sorted(gzipped, key=lambda i: (-source_bytes(specs[i].source), i)):
        owners[i] = min(range(team.size), key=lambda m: (load[m], m))
        load[owners[i]] += source_bytes(specs[i].source)
    return owners


def _my_tasks(
    team: Team, specs: Sequence[SourceSpec], plans: Sequence[_Plan], settings: EncodeSettings, target_bytes: int
) -> Iterator[tuple[int, _Task]]:
    """(source index, task) of this member's share of every source to build, in order."""
    owners = _gzip_owner(team, specs, plans)
    tag = f"{team.rank:05d}-"
    for i, (spec, plan) in enumerate(zip(specs, plans, strict=True)):
        if plan.tmp is None:
            continue
        opened = open_source(spec.source, settings.record_format)
        encode = settings.for_source(opened)
        if opened.table is not None:
            rows = team.share(len(opened.table))
            tasks = _table_tasks(opened, encode, target_bytes=target_bytes, out_dir=plan.tmp, rows=rows, tag=tag)
        elif is_gzip(spec.source.local):
            mine = owners[i] == team.rank
            tasks = (
                _gzip_tasks(spec.source.local, encode, target_bytes=target_bytes, out_dir=plan.tmp)
                if mine
                else iter(())
            )
        else:
            path, size = spec.source.local, spec.source.local.stat().st_size
            lo, hi = (line_start_at(path, b) for b in team.share(size))
            ranges = byte_ranges(path, target_bytes=target_bytes, start=lo, stop=hi) if hi > lo else []
            if size == 0 and team.writer:
                ranges = [(0, 0)]  # one empty part, as one process writes
            tasks = (
                _Task(str(path), a, b, encode, str(plan.tmp / f"part-{tag}{k:05d}")) for k, (a, b) in enumerate(ranges)
            )
        for task in tasks:
            yield i, task


def _build_share(
    team: Team,
    specs: Sequence[SourceSpec],
    plans: Sequence[_Plan],
    settings: EncodeSettings,
    num_workers: int,
    shard_bytes: int,
) -> list[_Done]:
    mine = sum(source_bytes(spec.source) for spec, plan in zip(specs, plans, strict=True) if plan.tmp) // team.size
    target = min(shard_bytes, max(1 << 20, mine // max(4 * num_workers, 1) + 1))
    workers = 1 if mine < IN_PROCESS_BYTES else num_workers
    pairs = list(_my_tasks(team, specs, plans, settings, target))
    index_of = {id(task): i for i, task in pairs}
    done = []
    for task, result in _results((task for _, task in pairs), workers):
        done.append(_Done(index_of[id(task)], task.stop - task.start, result.lines, int((result.lengths > 0).sum()),
                          int(result.lengths.sum()), result.skipped, result.skipped_examples, result.first_error,
                          task.unit))  # fmt: skip
    return done


def _merged(source: str, done: Sequence[_Done], strict: bool) -> PrepareReport:
    """The report of one source from its tasks' results in order, numbered as one process numbers its lines; under
    --strict, its first bad line's error."""
    report = PrepareReport(source=source)
    for task in done:
        first_line = report.lines + 1
        report.bytes += task.bytes
        report.lines += task.lines
        report.conversations += task.conversations
        report.tokens += task.tokens
        report.skipped += task.skipped
        for local, code, reason in task.examples:
            if len(report.skipped_examples) < MAX_REPORTED_SKIPS:
                report.skipped_examples.append(SkippedLine(first_line + local, code, reason))
        if task.first_error and strict:
            local, code, reason = task.first_error
            where = f"{source} {task.unit} {first_line + local}"
            raise DataError(code, f"{where}: {reason}", f"fix the {task.unit} or drop --strict to skip it")
    return report


def _publish(plan: _Plan, report: PrepareReport, settings: EncodeSettings) -> None:
    """meta.json last, then the rename: a directory in the cache is complete (the same as tokenize's _build)."""
    assert plan.tmp is not None
    report.directory = str(plan.target)
    skip = ("skipped_examples", "cached", "seconds", "directory")
    meta = {k: v for k, v in report.__dict__.items() if k not in skip}
    meta["skipped_examples"] = [[s.line_no, s.code, s.reason] for s in report.skipped_examples]
    meta["format_version"] = FORMAT_VERSION
    meta["train_on"] = settings.train_on
    write_json_atomic(plan.tmp / META_FILE, meta)
    try:
        os.rename(plan.tmp, plan.target)
    except OSError:
        if not (plan.target / META_FILE).is_file():  # not another job winning the race: a real failure
            raise
        shutil.rmtree(plan.tmp, ignore_errors=True)


def build_sources(
    specs: Sequence[SourceSpec],
    settings: EncodeSettings,
    team: Team,
    *,
    prepared_dir: Path,
    contents: Sequence[str],
    num_workers: int = 1,
    shard_bytes: int = 256 << 20,
    in_memory: bool = False,
) -> list[Built]:
    """Prepared shards of every source (read into RAM with `in_memory`), from the cache or built by the team, each
    member tokenizing its share. A bad line under --strict is the same error on every rank. Collective."""
    started = time.perf_counter()
    plans = team.agree(lambda: _plan(specs, settings, prepared_dir, contents))
    done = checked(team, lambda: _build_share(team, specs, plans, settings, num_workers, shard_bytes))
    everyone = together(team, lambda: done)

    def finish() -> dict[int, PrepareReport]:
        by_source: dict[int, list[_Done]] = {}
        for task in (task for member in everyone for task in member):  # in order: members, then their tasks
            by_source.setdefault(task.source, []).append(task)
        reports = {}
        for i, plan in enumerate(plans):
            if plan.tmp is not None:
                reports[i] = _merged(str(specs[i].source), by_source.get(i, []), settings.strict)
                reports[i].seconds = time.perf_counter() - started
        if team.writer:
            for i, report in reports.items():
                _publish(plans[i], report, settings)
        return reports

    try:
        reports = checked(team, finish)
    except LuminaError:
        if team.writer:
            for plan in plans:
                if plan.tmp is not None:
                    shutil.rmtree(plan.tmp, ignore_errors=True)
        raise
    return checked(
        team,
        lambda: [
            _opened(spec, plan, reports.get(i), in_memory)
            for i, (spec, plan) in enumerate(zip(specs, plans, strict=True))
        ],
    )


def _opened(spec: SourceSpec, plan: _Plan, report: PrepareReport | None, in_memory: bool) -> Built:
    if report is None:
        docs, report = _load_cached(plan.target, spec.source)
        if not in_memory:
            return docs, report
    name = str(spec.source)
    return open_shards(plan.target, name=name, in_memory=in_memory), report
