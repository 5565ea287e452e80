"""One rank's training batches: its micro-batches of the global packed rows (data/global_order.py), resumable at
any step on any number of ranks.

Row boundaries are a function of (seed, epoch, token counts) only, so the memory, sharded and streaming strategies
yield the same token stream, and so does any number of loader workers: a worker builds whole micro-batches, whose rows
are known before any document is fetched, and the loader hands them out in order. RowPacker packs a finite list of
documents (the evaluation file) the same greedy way.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lumina_ds.batch import IGNORE_INDEX, Batch
from lumina_ds.data.loading.global_order import GlobalRows, RowPosition
from lumina_ds.data.loading.mixture import Mixture
from lumina_ds.data.prepare.content import PIECES_PREFIX
from lumina_ds.data.prepare.documents import EncodedDoc, labels_of
from lumina_ds.data.records.types import SkippedLine
from lumina_ds.errors import DataError

Position = tuple[int, int]  # (epoch, index of a document in the packer's input)
Chunk = tuple[int, int, list[EncodedDoc | SkippedLine | None]]  # (epoch, index of the first item, items)
MAX_LOGGED_SKIPS = 5
ROW_ORDER = "global rows"
# a checkpoint from before files were hashed by pieces has another hash for an unchanged file over one piece
_REHASHED = (
    "; the checkpoint's lumina-ds hashed files over 1 MiB whole, this one by pieces: if the file is unchanged, "
    "--allow-changed-data resumes exactly"
)  # how a saved position is to be read (per-rank document indices before)


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
    """What one rank reads: all sources, how they mix, and which share of the global rows is its."""

    sources: Sequence[DocSource]
    mixture: Mixture
    rank: int = 0
    world_size: int = 1

    def lengths(self) -> np.ndarray:
        """Tokens of every document by global id (streamed sources count them first: data/lengths.py)."""
        missing = [s.name for s in self.sources if s.lengths is None]
        assert not missing, f"token counts of {missing} are unknown: count them first (lumina_ds.data.prepare.lengths)"
        parts = [np.asarray(s.lengths, dtype=np.int32) for s in self.sources]
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    def fetch(self, ids: np.ndarray) -> list[EncodedDoc | SkippedLine | None]:
        """Documents of these global ids, fetched per source, in order."""
        items: list[EncodedDoc | SkippedLine | None] = [None] * len(ids)
        located = [self.mixture.locate(int(doc_id)) for doc_id in ids]
        for source_index, source in enumerate(self.sources):
            slots = [i for i, (s, _) in enumerate(located) if s == source_index]
            if not slots:
                continue
            for slot, item in zip(slots, source.fetch([located[i][1] for i in slots]), strict=True):
                items[slot] = item
        return items

    def fetch_counted(self, ids: np.ndarray, lengths: np.ndarray) -> list[EncodedDoc]:
        """Documents that were counted with tokens; E109 if one no longer has the tokens it was counted with."""
        docs = []
        for doc_id, item in zip(ids.tolist(), self.fetch(ids), strict=True):
            if not isinstance(item, tuple) or len(item[0]) != lengths[doc_id]:
                source, index = self.mixture.locate(doc_id)
                raise DataError(
                    "E109",
                    f"line {index + 1} of {self.sources[source].name} no longer has the tokens it was counted with",
                    "the file changed during the run: restore it, or start a new run on the changed file",
                )
            docs.append(item)
        return docs


class MicroBatches(IterableDataset[dict[str, np.ndarray]]):
    """A rank's micro-batches after `start`: its n-th is global micro-batch world_size x n + rank.

    In loader workers, worker w of W builds micro-batches n with n % W == w (fetching and tokenizing their documents);
    the loader hands results out round-robin, which is exactly micro-batch order.
    """

    def __init__(
        self, view: RankView, rows: GlobalRows, start: RowPosition, *, micro_batch_size: int, pad_id: int
    ) -> None:
        self.view, self.rows, self.start = view, rows, start
        self.micro_batch_size, self.pad_id = micro_batch_size, pad_id

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for n in itertools.count(worker, workers):
            yield self.build(n)

    def build(self, n: int) -> dict[str, np.ndarray]:
        """Micro-batch `n` as arrays [B, S] per Batch field."""
        first = self.micro_batch_size * (self.view.world_size * n + self.view.rank)
        positions = [self.rows.advance(self.start, first)]
        for _ in range(self.micro_batch_size - 1):
            positions.append(self.rows.advance(positions[-1], 1))
        row_ids = [self.rows.docs(p) for p in positions]
        docs = iter(self.view.fetch_counted(np.concatenate(row_ids), self.rows.lengths))
        built = [build_row([next(docs) for _ in ids], seq_len=self.rows.seq_len, pad_id=self.pad_id) for ids in row_ids]
        return {key: np.stack([row[i] for row in built]) for i, key in enumerate(Batch._fields)}


def _keep_as_is(chunk: Any) -> Any:
    return chunk


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
        ids, labels, positions = build_row(pieces, seq_len=self.seq_len, pad_id=self.pad_id)
        return Row(ids, labels, positions, next_start)


def build_row(pieces: Sequence[EncodedDoc], *, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input ids, labels, positions) [S] of documents packed in order; the last may be cut at the row's end."""
    ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros(seq_len, dtype=np.int64)
    start = 0
    for tokens, targets in pieces:
        n = min(len(tokens), seq_len - start)
        ids[start : start + n] = tokens[:n]
        # a truncated document keeps its label at the cut: a real next token of the same document
        labels[start : start + n] = labels_of(tokens, targets)[:n]
        positions[start : start + n] = np.arange(n)
        start += n
    return ids, labels, positions


class PackedBatches:
    """This rank's micro-batches of the global packed rows, forever (epochs roll over); `state_dict` is one global
    row, the same on every rank, so a run resumes exactly on any number of ranks."""

    def __init__(
        self,
        view: RankView,
        *,
        seq_len: int,
        pad_id: int,
        micro_batch_size: int,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        contents: Sequence[Sequence[str]] = (),
        allow_changed: bool = False,
    ) -> None:
        view.mixture.check_world(view.world_size)
        self.contents = [list(pair) for pair in contents]  # [source, content hash] of each training source
        self.allow_changed = allow_changed  # --allow-changed-data: resume on other data from the saved row
        self.view = view
        self.rows = GlobalRows(view.mixture, view.lengths(), seq_len=seq_len)
        self.seq_len, self.pad_id, self.micro_batch_size = seq_len, pad_id, micro_batch_size
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.position: RowPosition = (0, 0)  # the first global row of the next step

    @property
    def epoch(self) -> int:
        """Epoch of the next unseen row (0-based)."""
        return self.rows.normalize(self.position)[0]

    def __iter__(self) -> Iterator[Batch]:
        """Batches of LongTensors [B, S] from the saved position on."""
        start = self.rows.normalize(self.position)
        step_rows = self.view.world_size * self.micro_batch_size
        for n, arrays in enumerate(self._arrays(start)):
            # every rank has drawn n + 1 micro-batches at a step boundary: all ranks' rows so far are consumed
            self.position = self.rows.advance(start, (n + 1) * step_rows)
            yield Batch(*(torch.from_numpy(arrays[key]) for key in Batch._fields))

    def _arrays(self, start: RowPosition) -> Iterator[dict[str, np.ndarray]]:
        dataset = MicroBatches(self.view, self.rows, start, micro_batch_size=self.micro_batch_size, pad_id=self.pad_id)
        if self.num_workers <= 0:
            yield from dataset
            return
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers must not reuse tokenizer threads
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor,
            collate_fn=_keep_as_is,
        )
        yield from loader

    def fingerprint(self) -> dict[str, Any]:
        """What the saved position is relative to; a resume with anything else different is refused (E107). The
        number of ranks is not part of it: the position is a global row."""
        mixture = self.view.mixture
        return {
            "documents": mixture.sizes,
            "weights": mixture.weights,
            "seed": mixture.seed,
            "seq_len": self.seq_len,
            "order": ROW_ORDER,
            "content": self.contents,
        }

    def state_dict(self) -> dict[str, Any]:
        """The first global row no rank has trained on."""
        epoch, row = self.position
        return {"epoch": epoch, "row": row, "fingerprint": self.fingerprint()}

    def check_resumable(self, state: dict[str, Any]) -> str | None:
        """E107 when the saved position belongs to other data (naming what differs); with `allow_changed`, the
        warning to print instead; None when the data is the checkpoint's."""
        if "row" not in state:
            raise DataError(
                "E107",
                "the checkpoint's data position is per rank: it was saved before lumina-ds ordered rows globally",
                "resume it with the lumina-ds version that saved it, or start a new run",
            )
        changes = fingerprint_changes(state.get("fingerprint") or {}, self.fingerprint())
        if not changes:
            return None
        what = "; ".join(changes)
        if self.allow_changed:
            return (f"warning: --allow-changed-data: the data changed since the checkpoint ({what}); training goes on "
                    f"at its global row {state['epoch']}:{state['row']} of the new data's order")  # fmt: skip
        raise DataError(
            "E107",
            f"the training data changed since the checkpoint: {what}",
            "resume with the data the checkpoint was trained on, or pass --allow-changed-data to continue on these "
            "files from the saved position (model and optimizer state are kept; the order of the rows is the new "
            "data's)",
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the global row after the last step taken before the state was saved."""
        self.check_resumable(state)
        self.position = (int(state["epoch"]), int(state["row"]))


def fingerprint_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's data fingerprint and this run's, one phrase each, the files first. Sources
    are matched by position, so a file moved or renamed with the same content is the same source."""
    before, after = saved.get("content", []), now.get("content", [])
    changes = [
        f"{source} differs from the checkpoint's {old_source} (content {old[:12]} -> {content[:12]}"
        + (f"{_REHASHED})" if PIECES_PREFIX in content and PIECES_PREFIX not in old else ")")
        for (old_source, old), (source, content) in zip(before, after, strict=False)
        if old != content
    ]
    if len(before) != len(after):
        changes.append(f"{len(before)} training source(s) -> {len(after)}")
    names = {"documents": "documents per source", "weights": "mixing weights", "seed": "seed", "seq_len": "seq_len",
             "order": "row order version"}  # fmt: skip
    changes += [f"{label} {saved.get(key)} -> {now.get(key)}" for key, label in names.items()
                if saved.get(key) != now.get(key)]  # fmt: skip
    return changes
