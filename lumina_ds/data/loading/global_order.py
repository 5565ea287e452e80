"""The global order of packed rows: each epoch's documents, in the mixture's order, packed greedily into one stream of
rows that does not depend on the number of ranks.

Optimizer step s takes the next global batch (micro-batch x accumulation x ranks) of rows. Rank r of W takes global
micro-batches r, r + W, r + 2W, ..., so with the same global batch the same micro-batches of the same rows make up
every step on any number of ranks: 2 ranks x 1 micro-batch and 1 rank x 2 accumulated micro-batches train on the
same rows, and a checkpoint's data position is one global row, whoever resumes it.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from lumina_ds.data.loading.mixture import Mixture
from lumina_ds.errors import DataError

RowPosition = tuple[int, int]  # (epoch, index of a row in that epoch's rows)
LENGTH_BLOCK = 1 << 20  # documents per Python list while finding row boundaries (bounds the temporary list)
CACHED_EPOCHS = 2  # a micro-batch can span the end of one epoch and the start of the next


def row_starts(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """Where greedy packing opens each row, as indices into `lengths` (documents in order), then len(lengths).

    Row k holds documents [starts[k], starts[k + 1]); empty documents (blank or skipped lines) never open a row. A
    document that does not fit opens the next row, one longer than a row fills a row alone (truncated).
    """
    starts: list[int] = []
    used = seq_len  # the first document with tokens opens a row
    for block in range(0, len(lengths), LENGTH_BLOCK):
        clipped = np.minimum(lengths[block : block + LENGTH_BLOCK], seq_len).tolist()
        for offset, n in enumerate(clipped):
            if n == 0:
                continue
            if used + n > seq_len:
                starts.append(block + offset)
                used = 0
            used += n
    return np.array([*starts, len(lengths)], dtype=np.int64)


class GlobalRows:
    """Row boundaries of every epoch, from each document's token count (`lengths[global document id]`).

    Only lengths are needed to place a row, so every rank and loader worker finds the same rows without tokenizing
    documents of other ranks. Two epochs' boundaries are cached; counts of rows per epoch are kept (a few bytes each).
    """

    def __init__(self, mixture: Mixture, lengths: np.ndarray, *, seq_len: int) -> None:
        assert len(lengths) == int(mixture.offsets[-1]), "one length per document of every source"
        self.mixture = mixture
        self.lengths = lengths
        self.seq_len = seq_len
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._counts: dict[int, int] = {}

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(global document ids in order, row starts) of one epoch."""
        if epoch not in self._epochs:
            order = self.mixture.epoch_order(epoch)
            starts = row_starts(self.lengths[order], self.seq_len)
            if len(starts) == 1:
                raise DataError(
                    "E105",
                    f"epoch {epoch} has no usable conversation (every line is blank or was skipped)",
                    "Add data; check the skipped-line report.",
                )
            self._epochs[epoch] = (order, starts)
            self._counts[epoch] = len(starts) - 1
            while len(self._epochs) > CACHED_EPOCHS:
                self._epochs.popitem(last=False)
        self._epochs.move_to_end(epoch)
        return self._epochs[epoch]

    def rows_in_epoch(self, epoch: int) -> int:
        if epoch not in self._counts:
            self.epoch(epoch)
        return self._counts[epoch]

    def normalize(self, position: RowPosition) -> RowPosition:
        """A position past the end of an epoch's rows is the start of the next epoch."""
        epoch, row = position
        while row >= self.rows_in_epoch(epoch):
            row -= self.rows_in_epoch(epoch)
            epoch += 1
        return epoch, row

    def advance(self, position: RowPosition, rows: int) -> RowPosition:
        """The position `rows` rows after `position`."""
        epoch, row = self.normalize(position)
        return self.normalize((epoch, row + rows))

    def docs(self, position: RowPosition) -> np.ndarray:
        """Global ids of the documents with tokens in the row at `position` (normalized), in order."""
        epoch, row = position
        order, starts = self.epoch(epoch)
        ids = order[starts[row] : starts[row + 1]]
        return ids[self.lengths[ids] > 0]

    def total_rows(self, epochs: int) -> int:
        """Rows in the first `epochs` epochs."""
        return sum(self.rows_in_epoch(e) for e in range(epochs))
