"""Ranks as threads of this process, with the all-gather data preparation uses: fast tests of how the work is
divided (data/ never sees torch.distributed; the collectives come in as callables)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from lumina_ds.data.prepare import meter
from lumina_ds.data.prepare.team import Team

T = TypeVar("T")
TIMEOUT_S = 120  # a rank that misses a collective fails the test instead of hanging it


class ThreadGroup:
    """`n` ranks' all-gather: each call waits for every rank's value."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.barrier = threading.Barrier(n, timeout=TIMEOUT_S)
        self.slots: list[Any] = [None] * n

    def all_gather(self, rank: int) -> Callable[[Any], list[Any]]:
        def gather(value: Any) -> list[Any]:
            self.slots[rank] = value
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()  # nobody overwrites a slot before every rank has copied them
            return out

        return gather


def on_ranks(n: int, work: Callable[[Team], T]) -> list[tuple[T, meter.Work]]:
    """`work(team)` on `n` thread ranks that share one directory; each rank's result and the work it did."""
    group = ThreadGroup(n)

    def rank(r: int) -> tuple[T, meter.Work]:
        meter.take()
        team = Team(rank=r, size=n, members=tuple(range(n)), all_gather=group.all_gather(r), world_size=n)
        try:
            return work(team), meter.take()
        except BaseException:
            group.barrier.abort()  # the others fail at their next collective instead of waiting out the timeout
            raise

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(rank, r) for r in range(n)]
        return [f.result(timeout=TIMEOUT_S) for f in futures]
