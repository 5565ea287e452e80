"""Counters of the data work one rank does: bytes of input read and tokens encoded.

They are per thread so that tests can run ranks as threads of one process, and they only count work in this process
(loader or tokenizer worker processes count in their own copies), which is what `benchmarks/data_scaling.py` runs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class Work:
    bytes_read: int = 0
    tokens_encoded: int = 0


class _PerThread(threading.local):
    def __init__(self) -> None:
        self.work = Work()


_COUNTS = _PerThread()


def read(n: int) -> None:
    _COUNTS.work.bytes_read += n


def encoded(n: int) -> None:
    _COUNTS.work.tokens_encoded += n


def take() -> Work:
    """This thread's counts since the last `take`, which starts new ones."""
    work, _COUNTS.work = _COUNTS.work, Work()
    return work
