"""Stream a JSONL chat file (plain or .gz) line by line; bad lines are skipped and reported (or, with strict, fatal)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lumina_ds.data.chat_format import Message
from lumina_ds.data.checks import DEFAULT_LIMIT, LineLimit, check_line, is_blank
from lumina_ds.data.files import LongLine, check_data_file, iter_lines, reading
from lumina_ds.errors import DataError


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


def parse_line(
    line_no: int, raw: bytes | LongLine, limit: LineLimit = DEFAULT_LIMIT
) -> list[Message] | SkippedLine | None:
    """Parse one raw line: the messages training uses, a SkippedLine for its first error, or None if blank."""
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
    with reading(path) as handle:
        yield from enumerate(iter_lines(handle, max_bytes=limit.max_bytes, whole=limit.truncate), start=1)


def require_conversation_lines(path: str | Path) -> None:
    """E105 when a file has no line but blank ones (or none): it cannot give training a single conversation."""
    path = check_data_file(path)
    lines = 0
    for line_no, raw in numbered_lines(path, LineLimit()):
        if isinstance(raw, LongLine) or not is_blank(line_no, raw):
            return
        lines = line_no
    what = "is empty" if lines == 0 else f"holds only {lines:,} blank line(s)"
    raise DataError(
        "E105", f"{path} {what}: no conversation to train on", "Check the path, or drop the file from the data."
    )


def _iter_lines(
    path: str | Path, *, strict: bool, limit: LineLimit
) -> Iterator[tuple[int, list[Message] | SkippedLine | None]]:
    """Yield every line parsed, blank lines as None; strict raises the first error line as a DataError."""
    path = open_data_file(path)
    for line_no, raw in numbered_lines(path, limit):
        parsed = parse_line(line_no, raw, limit)
        if strict and isinstance(parsed, SkippedLine):
            hint = f"Run `lumina-ds validate-data {path}` to list every problem; --fix-errors repairs some."
            raise DataError(parsed.code, f"{path} line {line_no}: {parsed.reason}", hint)
        yield line_no, parsed


def iter_conversations(
    path: str | Path, *, strict: bool = False, limit: LineLimit = DEFAULT_LIMIT
) -> Iterator[tuple[int, list[Message] | SkippedLine]]:
    """Yield `(line_no, messages or SkippedLine)` for every non-blank line, streaming (1-based line numbers)."""
    for line_no, parsed in _iter_lines(path, strict=strict, limit=limit):
        if parsed is not None:
            yield line_no, parsed


def read_conversations(path: str | Path, *, strict: bool = False, limit: LineLimit = DEFAULT_LIMIT) -> ReadResult:
    """Read a whole JSONL chat file into memory, collecting skipped lines (strict: raise at the first one)."""
    result = ReadResult()
    for line_no, item in _iter_lines(path, strict=strict, limit=limit):
        result.total_lines = line_no
        if isinstance(item, SkippedLine):
            result.skipped.append(item)
        elif item is not None:
            result.conversations.append(item)
    return result
