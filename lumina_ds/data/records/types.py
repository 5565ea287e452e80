"""What reading a record can give besides a conversation: a skipped line, with its code and why. A leaf module that
every stage (reading, tokenizing, streaming) shares."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SkippedLine:
    """A line that was not used, with the error code, why, and the stable kind name (see checks.KINDS)."""

    line_no: int
    code: str
    reason: str
    kind: str = ""
