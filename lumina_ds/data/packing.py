"""Pack encoded conversations into fixed-length rows, in order, with per-document positions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lumina_ds.data.chat_format import IGNORE_INDEX
from lumina_ds.errors import ConfigError


@dataclass
class PackedRows:
    """Fixed-length rows, each array [N, seq_len] int32; padding has label -100 and doc id -1."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    doc_ids: np.ndarray
    truncated: int = 0
    num_conversations: int = 0
    rows_without_targets: int = 0

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        """Row length in tokens."""
        return int(self.input_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens."""
        return int((self.doc_ids >= 0).sum())

    @property
    def num_target_tokens(self) -> int:
        """Positions with a training target."""
        return int((self.labels != IGNORE_INDEX).sum())


def _group_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Assign conversations to rows in order, opening a new row when the next one does not fit."""
    rows: list[list[int]] = []
    used = seq_len  # forces a new row for the first conversation
    for index, length in enumerate(lengths):
        if used + length > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += length
    return rows


def pack_conversations(encoded: Sequence[tuple[list[int], list[int]]], *, seq_len: int, pad_id: int) -> PackedRows:
    """Pack `(input_ids, labels)` pairs into rows of `seq_len`; longer conversations are truncated."""
    if seq_len < 2:
        raise ConfigError("E002", f"seq_len must be at least 2, got {seq_len}")
    # A truncated conversation keeps its label at the cut: it is a real next-token target from the same document.
    clipped = [(ids[:seq_len], labels[:seq_len]) for ids, labels in encoded]
    truncated = sum(len(ids) > seq_len for ids, _ in encoded)
    groups = _group_rows([len(ids) for ids, _ in clipped], seq_len)
    shape = (len(groups), seq_len)
    input_ids = np.full(shape, pad_id, dtype=np.int32)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int32)
    position_ids = np.zeros(shape, dtype=np.int32)
    doc_ids = np.full(shape, -1, dtype=np.int32)
    for row, members in enumerate(groups):
        start = 0
        for doc, index in enumerate(members):
            ids, labs = clipped[index]
            stop = start + len(ids)
            input_ids[row, start:stop] = ids
            labels[row, start:stop] = labs
            position_ids[row, start:stop] = np.arange(len(ids))
            doc_ids[row, start:stop] = doc
            start = stop
    return PackedRows(
        input_ids=input_ids,
        labels=labels,
        position_ids=position_ids,
        doc_ids=doc_ids,
        truncated=truncated,
        num_conversations=len(encoded),
        rows_without_targets=int((labels == IGNORE_INDEX).all(axis=1).sum()),
    )
