"""Stream the records of a data source (JSONL lines, table rows: data/sources.py); bad records are skipped and
reported (or, with strict, fatal)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lumina_ds.data.chat_format import Message
from lumina_ds.data.checks import DEFAULT_LIMIT, LineLimit, RawRecord, check_line
from lumina_ds.data.files import LongLine, check_data_file
from lumina_ds.data.sources import JSONL, DataSource, numbered_records, open_source
from lumina_ds.data.sources import require_conversation_lines as require_conversation_lines  # re-exported
from lumina_ds.errors import DataError

Location = str | Path | DataSource  # a path, `hf://NAME[:CONFIG][@SPLIT]`, or a parsed source


@dataclass(frozen=True)
class SkippedLine:
    """A line that was not used, with the error code, why, and the stable kind name (see checks.KINDS)."""

    line_no: int
    code: str
    reason: str
    kind: str = ""


@dataclass
class ReadResult:
    """Valid conversations of a file plus the skipped lines."""

    conversations: list[list[Message]] = field(default_factory=list)
    skipped: list[SkippedLine] = field(default_factory=list)
    total_lines: int = 0


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


def open_data_file(path: str | Path) -> Path:
    """Return the path of an existing UTF-8 data file, plain or .gz: E104 if it is missing, E110 if it is not text."""
    return check_data_file(path)


def numbered_lines(path: Path, limit: LineLimit) -> Iterator[tuple[int, bytes | LongLine]]:
    """`(line_no, raw)` of every line, decompressed if .gz; a line past the limit is a LongLine unless it is cut."""
    from lumina_ds.data.sources import numbered_lines as lines_of

    yield from lines_of(DataSource(str(path), JSONL, Path(path)), limit)


def _iter_lines(
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
    for line_no, parsed in _iter_lines(location, strict=strict, limit=limit):
        if parsed is not None:
            yield line_no, parsed


def read_conversations(location: Location, *, strict: bool = False, limit: LineLimit = DEFAULT_LIMIT) -> ReadResult:
    """Read a whole source into memory, collecting skipped records (strict: raise at the first one)."""
    result = ReadResult()
    for line_no, item in _iter_lines(location, strict=strict, limit=limit):
        result.total_lines = line_no
        if isinstance(item, SkippedLine):
            result.skipped.append(item)
        elif item is not None:
            result.conversations.append(item)
    return result
