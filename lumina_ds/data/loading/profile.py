"""How fast the data pipeline delivers batches (for `--profile-data-loading` and benchmarks/data_pipeline.py)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from lumina_ds.batch import IGNORE_INDEX, Batch


@dataclass
class LoaderRate:
    """Throughput of a batch iterator; `tokens` counts every row position, `target_tokens` those with a loss."""

    batches: int
    tokens: int
    target_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def summary(self) -> str:
        fill = self.target_tokens / max(self.tokens, 1)
        return (
            f"{self.batches} batches, {self.tokens:,} tokens in {self.seconds:.2f}s: "
            f"{self.tokens_per_s:,.0f} tokens/s ({self.batches / max(self.seconds, 1e-9):,.1f} batches/s, "
            f"{100 * fill:.0f}% of positions are targets)"
        )


def measure_batches(batches: Iterable[Batch], *, count: int, warmup: int = 1) -> LoaderRate:
    """Time `count` batches after `warmup` (worker start-up is not throughput)."""
    iterator = iter(batches)
    for _ in range(warmup):
        next(iterator)
    tokens = targets = 0
    started = time.perf_counter()
    for _ in range(count):
        batch = next(iterator)
        tokens += batch.num_tokens
        targets += int((batch.labels != IGNORE_INDEX).sum())
    return LoaderRate(count, tokens, targets, time.perf_counter() - started)
