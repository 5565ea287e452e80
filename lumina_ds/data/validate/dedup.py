"""Exact-duplicate detection in bounded memory: 8-byte digests of normalized conversations in one flat array."""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from lumina_ds.tokenizer import Message

_MAX_LOAD = 0.7  # linear probing stays short below ~70% occupancy


def conversation_digest(messages: Sequence[Message]) -> int:
    """64-bit blake2b digest of the conversation with canonical roles and trimmed contents."""
    # Separators are control characters, which valid contents cannot hold, so different splits cannot collide.
    text = "\x1e".join(f"{m.role}\x1f{m.content.strip()}" for m in messages)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class DigestSet:
    """A set of 64-bit digests in an open-addressing table: 8 bytes per slot (a Python set of ints costs ~70)."""

    def __init__(self, capacity_log2: int = 16) -> None:
        self._slots = array("Q", [0]) * (1 << capacity_log2)
        self._mask = (1 << capacity_log2) - 1
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        """Memory held by the table."""
        return len(self._slots) * self._slots.itemsize

    def add(self, digest: int) -> bool:
        """Insert a digest; True if it was not there before."""
        digest = digest or 1  # 0 marks an empty slot; merging digest 0 into 1 costs a 2^-64 collision chance
        slots, mask = self._slots, self._mask
        index = digest & mask
        while True:
            held = slots[index]
            if held == 0:
                break
            if held == digest:
                return False
            index = (index + 1) & mask
        slots[index] = digest
        self._size += 1
        if self._size > _MAX_LOAD * mask:
            self._grow()
        return True

    def _grow(self) -> None:
        old = self._slots
        self._slots = array("Q", [0]) * (2 * len(old))
        self._mask = 2 * len(old) - 1
        self._size = 0
        for digest in old:
            if digest:
                self.add(digest)
