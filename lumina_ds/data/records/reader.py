"""Stream the records of a data source (JSONL lines, table rows: records/sources.py) as conversations; bad records are
skipped and reported (or, with strict, fatal)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from lumina_ds.data.records.checks import DEFAULT_LIMIT, LineLimit, RawRecord, check_line
from lumina_ds.data.records.sources import DataSource, numbered_records, open_source
from lumina_ds.data.records.types import SkippedLine
from lumina_ds.errors import DataError
from lumina_ds.tokenizer import Message

Location = str | Path | DataSource  # a path, `hf://NAME[:CONFIG][@SPLIT]`, or a parsed source


def parse_line(line_no: int, raw: RawRecord, limit: LineLimit = DEFAULT_LIMIT) -> list[Message] | SkippedLine | None:
    """Parse one raw line or row: the messages training uses, a SkippedLine for its first error, or None if blank."""
    checked = check_line(line_no, raw, limit)
    if checked is None:
        return None
    if checked.messages is not None:
        return checked.messages
    error = checked.error
    assert error is not None
    return SkippedLine(line_no, error.code, error.reason, error.kind)


def iter_records(
    location: Location, *, strict: bool, limit: LineLimit
) -> Iterator[tuple[int, list[Message] | SkippedLine | None]]:
    """Yield every record parsed, blank lines as None; strict raises the first bad record as a DataError."""
    opened = open_source(location, limit.record_format)
    limit = opened.limit(limit)
    unit = opened.source.unit
    for line_no, raw in numbered_records(opened, limit):
        parsed = parse_line(line_no, raw, limit)
        if strict and isinstance(parsed, SkippedLine):
            hint = f"Run `lumina-ds validate-data {opened.source}` to list every problem; --fix-errors repairs some."
            raise DataError(parsed.code, f"{opened.source} {unit} {line_no}: {parsed.reason}", hint)
        yield line_no, parsed


def iter_conversations(
    location: Location, *, strict: bool = False, limit: LineLimit = DEFAULT_LIMIT
) -> Iterator[tuple[int, list[Message] | SkippedLine]]:
    """Yield `(number, messages or SkippedLine)` for every non-blank record, streaming (1-based line or row)."""
    for line_no, parsed in iter_records(location, strict=strict, limit=limit):
        if parsed is not None:
            yield line_no, parsed


def sample_texts(locations: Iterable[Location], *, max_bytes: int, limit: LineLimit = DEFAULT_LIMIT) -> Iterator[str]:
    """Message contents of data sources (`limit` carries --data-format/--data-fields), streamed in order, until about
    `max_bytes` of text (bad records are skipped): a BPE vocabulary needs a sample, not a multi-GB corpus in memory."""
    budget = max_bytes
    for location in locations:
        for _, item in iter_conversations(location, limit=limit):
            if isinstance(item, SkippedLine):
                continue
            for message in item:
                budget -= len(message.content.encode())
                yield message.content
            if budget <= 0:
                return
