"""Stream a JSONL chat file line by line; bad lines are skipped and reported (or, with strict, fatal)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lumina_ds.data.chat_format import Message
from lumina_ds.data.checks import check_line
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


def parse_line(line_no: int, raw: bytes) -> list[Message] | SkippedLine | None:
    """Parse one raw line: the messages training uses, a SkippedLine for its first error, or None if blank."""
    checked = check_line(line_no, raw)
    if checked is None:
        return None
    if checked.messages is not None:
        return checked.messages
    error = checked.error
    assert error is not None
    return SkippedLine(line_no, error.code, error.reason, error.kind)


def open_data_file(path: str | Path) -> Path:
    """Return the path of an existing data file; raises E104 if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise DataError("E104", f"data file not found: {path}", "Check the path; expected a .jsonl file.")
    return path


def _iter_lines(path: str | Path, *, strict: bool) -> Iterator[tuple[int, list[Message] | SkippedLine | None]]:
    """Yield every line parsed, blank lines as None; strict raises the first error line as a DataError."""
    path = open_data_file(path)
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            parsed = parse_line(line_no, raw)
            if strict and isinstance(parsed, SkippedLine):
                hint = f"Run `lumina-ds validate-data {path}` to list every problem; --fix-errors repairs some."
                raise DataError(parsed.code, f"{path} line {line_no}: {parsed.reason}", hint)
            yield line_no, parsed


def iter_conversations(path: str | Path, *, strict: bool = False) -> Iterator[tuple[int, list[Message] | SkippedLine]]:
    """Yield `(line_no, messages or SkippedLine)` for every non-blank line, streaming (1-based line numbers)."""
    for line_no, parsed in _iter_lines(path, strict=strict):
        if parsed is not None:
            yield line_no, parsed


def read_conversations(path: str | Path, *, strict: bool = False) -> ReadResult:
    """Read a whole JSONL chat file into memory, collecting skipped lines (strict: raise at the first one)."""
    result = ReadResult()
    for line_no, item in _iter_lines(path, strict=strict):
        result.total_lines = line_no
        if isinstance(item, SkippedLine):
            result.skipped.append(item)
        elif item is not None:
            result.conversations.append(item)
    return result
