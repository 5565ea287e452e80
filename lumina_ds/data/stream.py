"""One rank's training batches: its documents in epoch order, packed into rows, resumable at any batch.

The order is a function of (seed, epoch, world size) only, and packing is greedy in that order, so the memory,
sharded and streaming strategies yield the same token stream, and so does any number of loader workers: workers
only fetch and tokenize chunks of documents, which are packed in order in the training process.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lumina_ds.batch import IGNORE_INDEX, Batch
from lumina_ds.data.documents import EncodedDoc, labels_of
from lumina_ds.data.mixture import Mixture
from lumina_ds.data.reader import SkippedLine
from lumina_ds.errors import DataError

Position = tuple[int, int]  # (epoch, index into this rank's documents of that epoch)
Chunk = tuple[int, int, list[EncodedDoc | SkippedLine | None]]  # (epoch, index of the first item, items)
MAX_LOGGED_SKIPS = 5


class DocSource(Protocol):
    """Documents of one input file (TokenizedDocs or JsonlDocs)."""

    name: str

    @property
    def lengths(self) -> np.ndarray | None:
        """Tokens per document when known (tokenized sources), else None."""

    def __len__(self) -> int: ...

    def fetch(self, indices: Sequence[int]) -> list[EncodedDoc | SkippedLine | None]: ...


@dataclass(frozen=True)
class RankView:
    """What one rank reads: all sources, how they mix, and its share."""

    sources: Sequence[DocSource]
    mixture: Mixture
    rank: int = 0
    world_size: int = 1

    def docs(self, epoch: int) -> np.ndarray:
        return self.mixture.rank_docs(epoch, rank=self.rank, world_size=self.world_size)

    def normalize(self, position: Position) -> Position:
        """A position at the end of an epoch is the start of the next one."""
        epoch, index = position
        return (epoch + 1, 0) if index >= len(self.docs(epoch)) else position

    def chunk_starts(self, start: Position, chunk_docs: int) -> Iterator[tuple[int, int, int]]:
        """(epoch, first index, stop index) of every chunk from `start` on, forever."""
        epoch, index = self.normalize(start)
        while True:
            count = len(self.docs(epoch))
            for first in range(index, count, chunk_docs):
                yield epoch, first, min(first + chunk_docs, count)
            epoch, index = epoch + 1, 0

    def fetch(self, epoch: int, first: int, stop: int) -> Chunk:
        """Documents [first, stop) of this rank's epoch, fetched per source, in order."""
        ids = self.docs(epoch)[first:stop]
        items: list[EncodedDoc | SkippedLine | None] = [None] * len(ids)
        located = [self.mixture.locate(int(doc_id)) for doc_id in ids]
        for source_index, source in enumerate(self.sources):
            slots = [i for i, (s, _) in enumerate(located) if s == source_index]
            for slot, item in zip(slots, source.fetch([located[i][1] for i in slots]), strict=True):
                items[slot] = item
        return epoch, first, items


class _ChunkDataset(IterableDataset[Chunk]):
    """Loader-worker side: worker w of W fetches (and tokenizes) chunks k with k % W == w."""

    def __init__(self, view: RankView, start: Position, chunk_docs: int) -> None:
        self.view, self.start, self.chunk_docs = view, start, chunk_docs

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for k, (epoch, first, stop) in enumerate(self.view.chunk_starts(self.start, self.chunk_docs)):
            if k % workers == worker:
                yield self.view.fetch(epoch, first, stop)


def _keep_as_is(chunk: Any) -> Any:
    return chunk


def iterate_chunks(
    view: RankView, start: Position, *, num_workers: int = 0, prefetch_factor: int = 2, chunk_docs: int = 64
) -> Iterator[Chunk]:
    """Chunks of this rank's documents from `start`, in order; fetched by `num_workers` processes when > 0.

    The loader hands out worker results round-robin, which with the k % W assignment is exactly chunk order.
    """
    if num_workers <= 0:
        for epoch, first, stop in view.chunk_starts(start, chunk_docs):
            yield view.fetch(epoch, first, stop)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers must not reuse tokenizer threads
    loader = DataLoader(
        _ChunkDataset(view, start, chunk_docs),
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor,
        collate_fn=_keep_as_is,
    )
    yield from loader


@dataclass
class Row:
    """One packed row [S] and where the row after it starts."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    next_start: Position


class RowPacker:
    """Greedy packing in document order: a document that does not fit opens a new row; one longer than a row is
    truncated to fill a row alone; an epoch always starts a new row. Padding: pad id, label IGNORE_INDEX, position 0."""

    def __init__(self, *, seq_len: int, pad_id: int, strict: bool = False, rank: int = 0) -> None:
        assert seq_len >= 2
        self.seq_len, self.pad_id, self.strict, self.rank = seq_len, pad_id, strict, rank
        self.skipped = 0

    def rows(self, chunks: Iterator[Chunk]) -> Iterator[Row]:
        pieces: list[EncodedDoc] = []
        used, epoch_tokens, current_epoch, whole_epoch = 0, 0, None, False
        for epoch, first, items in chunks:
            for offset, item in enumerate(items):
                position = (epoch, first + offset)
                if epoch != current_epoch:
                    if whole_epoch and epoch_tokens == 0:  # would otherwise loop forever without a batch
                        raise DataError(
                            "E105",
                            f"rank {self.rank} got no usable conversation in epoch {current_epoch}",
                            "Add data or use fewer data-parallel ranks; check the skipped-line report.",
                        )
                    if pieces:
                        yield self._row(pieces, position)
                    pieces, used, epoch_tokens, current_epoch = [], 0, 0, epoch
                    whole_epoch = position[1] == 0
                doc = self._usable(item)
                if doc is None:
                    continue
                length = min(len(doc[0]), self.seq_len)
                epoch_tokens += length
                if used + length > self.seq_len:
                    yield self._row(pieces, position)
                    pieces, used = [], 0
                pieces.append(doc)
                used += length
                if used == self.seq_len:
                    yield self._row(pieces, (epoch, first + offset + 1))
                    pieces, used = [], 0
        if pieces and current_epoch is not None:  # a finite input (evaluation) ends with its last partial row
            yield self._row(pieces, (current_epoch + 1, 0))

    def _usable(self, item: EncodedDoc | SkippedLine | None) -> EncodedDoc | None:
        if isinstance(item, SkippedLine):
            self.skipped += 1
            if self.strict:
                raise DataError(item.code, f"line {item.line_no}: {item.reason}", "fix it or drop --strict")
            if self.skipped <= MAX_LOGGED_SKIPS:
                print(f"[rank {self.rank}] skipped line {item.line_no} ({item.code}: {item.reason})", file=sys.stderr)
            return None
        return item

    def _row(self, pieces: list[EncodedDoc], next_start: Position) -> Row:
        S = self.seq_len
        ids = np.full(S, self.pad_id, dtype=np.int64)
        labels = np.full(S, IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros(S, dtype=np.int64)
        start = 0
        for tokens, targets in pieces:
            n = min(len(tokens), S - start)
            ids[start : start + n] = tokens[:n]
            # a truncated document keeps its label at the cut: a real next token of the same document
            labels[start : start + n] = labels_of(tokens, targets)[:n]
            positions[start : start + n] = np.arange(n)
            start += n
        return Row(ids, labels, positions, next_start)


def count_rows(lengths: Sequence[int] | np.ndarray, seq_len: int) -> int:
    """Rows RowPacker makes from documents of these lengths in this order (one epoch)."""
    rows, used = 0, seq_len
    for n in np.minimum(np.asarray(lengths, dtype=np.int64), seq_len).tolist():
        if n == 0:
            continue
        if used + n > seq_len:
            rows, used = rows + 1, 0
        used += n
    return rows


class PackedBatches:
    """This rank's micro-batches of packed rows, forever (epochs roll over); `state_dict` resumes exactly."""

    def __init__(
        self,
        view: RankView,
        *,
        seq_len: int,
        pad_id: int,
        micro_batch_size: int,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        strict: bool = False,
    ) -> None:
        view.mixture.check_world(view.world_size)
        self.view = view
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.packer = RowPacker(seq_len=seq_len, pad_id=pad_id, strict=strict, rank=view.rank)
        self.position: Position = (0, 0)

    @property
    def epoch(self) -> int:
        """Epoch of the next unseen document (0-based)."""
        return self.view.normalize(self.position)[0]

    def __iter__(self) -> Iterator[Batch]:
        """Batches of LongTensors [B, S] from the saved position on."""
        chunks = iterate_chunks(
            self.view, self.position, num_workers=self.num_workers, prefetch_factor=self.prefetch_factor
        )
        rows = self.packer.rows(chunks)
        while True:
            batch = [next(rows) for _ in range(self.micro_batch_size)]
            self.position = batch[-1].next_start
            yield Batch(*(torch.from_numpy(np.stack([getattr(row, key) for row in batch])) for key in Batch._fields))

    def fingerprint(self) -> dict[str, Any]:
        """What the saved position is relative to; a resume with anything else different is refused (E107)."""
        mixture = self.view.mixture
        return {
            "documents": mixture.sizes,
            "weights": mixture.weights,
            "seed": mixture.seed,
            "world_size": self.view.world_size,
            "seq_len": self.seq_len,
        }

    def state_dict(self) -> dict[str, Any]:
        """Position of the first document not yet in a yielded batch."""
        epoch, index = self.position
        return {"epoch": epoch, "index": index, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue right after the last batch yielded before the state was saved."""
        saved = state.get("fingerprint")
        if saved != self.fingerprint():
            raise DataError(
                "E107",
                f"the checkpoint's data position is for {saved}, this run has {self.fingerprint()}",
                "Resume with the same training files, mixing weights, seed, seq_len and number of ranks.",
            )
        self.position = (int(state["epoch"]), int(state["index"]))
