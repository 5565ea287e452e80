"""Bounded-memory length statistics: exact counts for small values, 1/16-octave buckets above, text histograms."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from lumina_ds.tokenizer import Message

EXACT_BELOW = 4096  # values below are counted exactly; above, within 1/16 octave (< 6.3% relative error)
_SUB_BITS = 4
PERCENTILES = (50, 90, 99)
BAR_WIDTH = 40


def _bucket(value: int) -> int:
    """Key of a large value: octave and the next 4 bits of the value, so buckets nest inside powers of two."""
    octave = value.bit_length() - 1
    sub = (value >> (octave - _SUB_BITS)) & ((1 << _SUB_BITS) - 1)
    return EXACT_BELOW + (octave << _SUB_BITS) + sub


def _bucket_bounds(key: int) -> tuple[int, int]:
    """Inclusive value range of a key."""
    if key < EXACT_BELOW:
        return key, key
    octave, sub = divmod(key - EXACT_BELOW, 1 << _SUB_BITS)
    width = 1 << (octave - _SUB_BITS)
    low = (1 << octave) + sub * width
    return low, low + width - 1


class Histogram:
    """Count, sum, min, max and a bounded histogram of non-negative integers; memory does not grow with count."""

    def __init__(self) -> None:
        self._counts: defaultdict[int, int] = defaultdict(int)
        self.total = 0
        self._max_large = 0
        self._min_large = 0

    def add(self, value: int) -> None:
        """Count one value."""
        self.total += value
        if value < EXACT_BELOW:
            self._counts[value] += 1
            return
        self._counts[_bucket(value)] += 1
        self._max_large = max(self._max_large, value)
        self._min_large = value if not self._min_large else min(self._min_large, value)

    @property
    def count(self) -> int:
        return sum(self._counts.values())

    @property
    def min(self) -> int:
        smallest = min(self._counts, default=0)
        return smallest if smallest < EXACT_BELOW else self._min_large

    @property
    def max(self) -> int:
        return self._max_large or max(self._counts, default=0)

    def percentile(self, p: float) -> int:
        """Nearest-rank percentile: the smallest value with at least p% of the values at or below it."""
        count = self.count
        if not count:
            return 0
        rank = max(1, math.ceil(p / 100 * count))
        seen = 0
        for key in sorted(self._counts):
            seen += self._counts[key]
            if seen >= rank:
                low, high = _bucket_bounds(key)
                # Inside a large bucket report its middle, clamped to the values actually seen.
                return min(max((low + high) // 2, self.min), self.max)
        raise AssertionError("rank beyond count")

    def octaves(self) -> list[tuple[int, int, int]]:
        """Counts in log-spaced buckets `(low, high, count)`: 0, 1, 2-3, 4-7, ... from min to max."""
        per_octave: defaultdict[int, int] = defaultdict(int)
        for key, n in self._counts.items():
            per_octave[_bucket_bounds(key)[0].bit_length()] += n
        if not per_octave:
            return []
        rows = []
        for bits in range(min(per_octave), max(per_octave) + 1):
            low, high = (0, 0) if bits == 0 else (1 << (bits - 1), (1 << bits) - 1)
            rows.append((low, high, per_octave.get(bits, 0)))
        return rows

    def summary(self) -> dict[str, Any]:
        """Count, mean, min, percentiles, max and the log-spaced histogram, as JSON-ready values."""
        count = self.count
        out: dict[str, Any] = {"count": count, "mean": round(self.total / count, 3) if count else 0.0}
        out["min"] = self.min
        out.update({f"p{p}": self.percentile(p) for p in PERCENTILES})
        out["max"] = self.max
        out["histogram"] = [list(row) for row in self.octaves()]
        return out


def render(title: str, summary: dict[str, Any]) -> list[str]:
    """Text lines for one histogram summary: a header with the numbers, then one `#` bar per bucket."""
    numbers = ", ".join(f"{k} {summary[k]:,}" for k in ("count", "mean", "min", "p50", "p90", "p99", "max"))
    lines = [f"{title}: {numbers}"]
    rows = summary["histogram"]
    peak = max((n for _, _, n in rows), default=0)
    for low, high, n in rows:
        bar = "#" * max(1 if n else 0, round(BAR_WIDTH * n / peak)) if peak else ""
        lines.append(f"  {low:>9,} - {high:<9,} |{bar:<{BAR_WIDTH}} {n:,}")
    return lines


class DatasetStats:
    """Statistics over the conversations training keeps (duplicates included)."""

    def __init__(self, *, with_tokens: bool) -> None:
        self.messages_by_role: defaultdict[str, int] = defaultdict(int)
        self.turns = Histogram()
        self.chars = Histogram()
        self.tokens_per_message = Histogram() if with_tokens else None
        self.tokens_per_conversation = Histogram() if with_tokens else None

    def add(self, messages: Sequence[Message], token_counts: tuple[list[int], int] | None = None) -> None:
        """Count one conversation; `token_counts` is (tokens per message, tokens of the whole conversation)."""
        self.turns.add(len(messages))
        by_role, chars = self.messages_by_role, self.chars
        for message in messages:
            by_role[message.role] += 1
            chars.add(len(message.content))
        if token_counts is not None:
            assert self.tokens_per_message is not None and self.tokens_per_conversation is not None
            for n in token_counts[0]:
                self.tokens_per_message.add(n)
            self.tokens_per_conversation.add(token_counts[1])

    def histograms(self) -> dict[str, Histogram]:
        """The histograms by report name (token ones only with a tokenizer)."""
        out = {"turns_per_conversation": self.turns, "chars_per_message": self.chars}
        if self.tokens_per_message is not None and self.tokens_per_conversation is not None:
            out["tokens_per_message"] = self.tokens_per_message
            out["tokens_per_conversation"] = self.tokens_per_conversation
        return out

    def summary(self) -> dict[str, Any]:
        """JSON-ready statistics."""
        out: dict[str, Any] = {
            "conversations": self.turns.count,
            "messages": self.chars.count,
            "messages_by_role": dict(sorted(self.messages_by_role.items())),
            "chars": self.chars.total,
        }
        if self.tokens_per_conversation is not None:
            out["tokens"] = self.tokens_per_conversation.total
        out.update({name: hist.summary() for name, hist in self.histograms().items()})
        return out
