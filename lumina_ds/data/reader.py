"""Stream a JSONL chat file line by line; bad lines are skipped and reported, never fatal."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lumina_ds.data.chat_format import Message, parse_conversation
from lumina_ds.errors import DataError

_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class SkippedLine:
    """A line that was not used, with the error code and why."""

    line_no: int
    code: str
    reason: str


@dataclass
class ReadResult:
    """Valid conversations of a file plus the skipped lines."""

    conversations: list[list[Message]] = field(default_factory=list)
    skipped: list[SkippedLine] = field(default_factory=list)
    total_lines: int = 0


def parse_line(line_no: int, raw: bytes) -> list[Message] | SkippedLine | None:
    """Parse one raw line: messages, a SkippedLine, or None for a blank line."""
    if line_no == 1 and raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return SkippedLine(line_no, "E103", f"invalid UTF-8 at byte {exc.start}: {exc.reason}")
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return SkippedLine(line_no, "E101", f"invalid JSON: {exc.msg} (column {exc.colno})")
    try:
        return parse_conversation(obj)
    except DataError as exc:
        return SkippedLine(line_no, exc.code, exc.message)


def _iter_lines(path: str | Path) -> Iterator[tuple[int, list[Message] | SkippedLine | None]]:
    """Yield every line parsed, blank lines as None; raises E104 if the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise DataError("E104", f"data file not found: {path}", "Check the path; expected a .jsonl file.")
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            yield line_no, parse_line(line_no, raw)


def iter_conversations(path: str | Path) -> Iterator[tuple[int, list[Message] | SkippedLine]]:
    """Yield `(line_no, messages or SkippedLine)` for every non-blank line, streaming (1-based line numbers)."""
    for line_no, parsed in _iter_lines(path):
        if parsed is not None:
            yield line_no, parsed


def read_conversations(path: str | Path) -> ReadResult:
    """Read a whole JSONL chat file into memory, collecting skipped lines."""
    result = ReadResult()
    for line_no, item in _iter_lines(path):
        result.total_lines = line_no
        if isinstance(item, SkippedLine):
            result.skipped.append(item)
        elif item is not None:
            result.conversations.append(item)
    return result
