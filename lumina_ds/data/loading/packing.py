"""Packed rows held in memory (the evaluation set) and random access to them as tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lumina_ds.batch import Batch


@dataclass
class PackedRows:
    """Fixed-length rows, each array [N, seq_len] int64; padding has label IGNORE_INDEX and position 0."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    num_conversations: int = 0

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        """Row length in tokens."""
        return int(self.input_ids.shape[1])


class PackedDataset:
    """Random access to packed rows as torch tensors."""

    def __init__(self, rows: PackedRows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: Sequence[int]) -> Batch:
        """Stack the given rows into a Batch of LongTensors [B, S]."""
        import torch

        index = np.asarray(indices, dtype=np.int64)
        return Batch(*(torch.from_numpy(getattr(self.rows, key)[index].astype(np.int64)) for key in Batch._fields))
