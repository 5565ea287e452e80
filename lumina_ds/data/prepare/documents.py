"""Conversations as token documents: the batched encoder and the two ways to hold them (tokenized or raw JSONL).

A document is one line of an input file; blank and malformed lines are documents with no tokens, so that every
strategy (memory, sharded, streaming) numbers and shuffles the same documents and yields the same token stream.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tokenizers import Encoding

from lumina_ds.batch import IGNORE_INDEX
from lumina_ds.data.prepare import meter
from lumina_ds.data.records.checks import DEFAULT_LIMIT, LineLimit, RawRecord
from lumina_ds.data.records.files import HEAD_BYTES, LongLine, is_gzip
from lumina_ds.data.records.formats import Row
from lumina_ds.data.records.reader import parse_line
from lumina_ds.data.records.tables import RowTable
from lumina_ds.data.records.types import SkippedLine
from lumina_ds.errors import ConfigError, DataError
from lumina_ds.tokenizer import ROLE_TOKENS, TRAIN_ON_CHOICES, ChatTokenizer, EncodedDoc, Message, newline_tokens


def labels_of(ids: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Pre-shifted labels [T] int64: ids[t + 1] where target[t], else IGNORE_INDEX."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    flags = target[:-1].astype(bool)
    labels[:-1][flags] = ids[1:][flags]
    return labels


class DocEncoder:
    """Encodes raw JSONL lines into documents with the chat template, one tokenizer call per chunk of lines."""

    def __init__(
        self, tokenizer: ChatTokenizer, *, train_on: str = "assistant", limit: LineLimit = DEFAULT_LIMIT
    ) -> None:
        if train_on not in TRAIN_ON_CHOICES:
            raise ConfigError("E002", f"train_on must be one of {TRAIN_ON_CHOICES}, got {train_on!r}")
        self.tokenizer, self.limit = tokenizer, limit
        self.train_all = train_on == "all"
        self.codec = tokenizer.codec  # a model's own chat template (tokenizer/codec.py), else our format
        if self.codec is not None:
            return
        self._newline = tokenizer.encode("\n")
        self._bos = tokenizer.bos_id
        self._end = tokenizer.end_id
        self._role = {role: tokenizer.token_id(token) for role, token in ROLE_TOKENS.items()}

    def encode_lines(self, lines: Sequence[tuple[int, RawRecord]]) -> list[EncodedDoc | SkippedLine | None]:
        """`(line_no, raw)` pairs (lines, or a table's rows) -> a document, a SkippedLine, or None (blank) per line."""
        out = self._encode_lines(lines)
        meter.encoded(sum(len(item[0]) for item in out if isinstance(item, tuple)))
        return out

    def _encode_lines(self, lines: Sequence[tuple[int, RawRecord]]) -> list[EncodedDoc | SkippedLine | None]:
        parsed = [parse_line(line_no, raw, self.limit) for line_no, raw in lines]
        if self.codec is not None:
            numbers = [n for (n, _), item in zip(lines, parsed, strict=True) if isinstance(item, list)]
            encoded = self.codec.encode_docs(
                [item for item in parsed if isinstance(item, list)], train_all=self.train_all
            )
            docs = iter(SkippedLine(n, e.code, e.message) if isinstance(e, DataError) else e
                        for n, e in zip(numbers, encoded, strict=True))  # fmt: skip
            return [next(docs) if isinstance(item, list) else item for item in parsed]
        # "\n" + content: the text between two special tokens, tokenized whole (see ChatTemplate.encode_conversation)
        contents = ["\n" + m.content for item in parsed if isinstance(item, list) for m in item]
        encodings = self.tokenizer.backend.encode_batch(contents, add_special_tokens=False) if contents else []
        pieces = iter(encodings)
        out: list[EncodedDoc | SkippedLine | None] = []
        for item in parsed:
            if isinstance(item, list):
                out.append(self._assemble(item, [next(pieces) for _ in item]))
            else:
                out.append(item)
        return out

    def _assemble(self, messages: Sequence[Message], bodies: Sequence[Encoding]) -> EncodedDoc:
        # Same layout as ChatTemplate.encode_conversation (a test keeps them equal), built from batched encodings.
        ids = [self._bos]
        trainable = [False]
        for message, body in zip(messages, bodies, strict=True):
            learn = self.train_all or message.role == "assistant"
            head = newline_tokens(body.offsets)
            header, content = [self._role[message.role], *body.ids[:head]], body.ids[head:]
            for piece, flag in ((header, self.train_all), (content, learn), ([self._end], learn)):
                ids.extend(piece)
                trainable.extend([flag] * len(piece))
            ids.extend(self._newline)
            trainable.extend([self.train_all] * len(self._newline))
        target = np.zeros(len(ids), dtype=np.uint8)
        target[:-1] = trainable[1:]
        return np.asarray(ids, dtype=np.int32), target


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


@dataclass
class TokenizedPart:
    """Consecutive documents of one source: tokens and target flags back to back, `offsets` [n_docs + 1]."""

    tokens: np.ndarray
    targets: np.ndarray
    offsets: np.ndarray


class TokenizedDocs:
    """Documents of one source held as token arrays, in RAM (memory strategy) or memory-mapped (sharded)."""

    def __init__(self, name: str, parts: Sequence[TokenizedPart]) -> None:
        self.name = name
        self.parts = list(parts)
        counts = np.array([len(p.offsets) - 1 for p in self.parts], dtype=np.int64)
        self._first_doc = np.concatenate([[0], np.cumsum(counts)])  # [n_parts + 1]
        self.lengths = np.concatenate([np.diff(p.offsets) for p in self.parts]) if self.parts else np.zeros(0, int)

    def __len__(self) -> int:
        return int(self._first_doc[-1])

    @property
    def num_tokens(self) -> int:
        """Tokens over all documents."""
        return int(self.lengths.sum())

    def doc(self, index: int) -> EncodedDoc | None:
        """Tokens and target flags of document `index`; None when the line held no conversation."""
        part_index = int(np.searchsorted(self._first_doc, index, side="right")) - 1
        part = self.parts[part_index]
        local = index - int(self._first_doc[part_index])
        start, stop = int(part.offsets[local]), int(part.offsets[local + 1])
        if start == stop:
            return None
        return np.asarray(part.tokens[start:stop], dtype=np.int32), np.asarray(part.targets[start:stop])

    def fetch(self, indices: Sequence[int]) -> list[EncodedDoc | SkippedLine | None]:
        """The given documents (problems were reported when the source was tokenized)."""
        return [self.doc(int(i)) for i in indices]


def scan_line_offsets(path: Path, *, block_bytes: int = 1 << 24) -> np.ndarray:
    """Byte offset of every line start plus the file size: [n_lines + 1] int64, lines numbered as `for line in f`."""
    starts = [np.zeros(1, dtype=np.int64)]
    size = 0
    with path.open("rb") as handle:
        while block := handle.read(block_bytes):
            meter.read(len(block))
            newlines = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10).astype(np.int64)
            starts.append(newlines + size + 1)
            size += len(block)
    offsets = np.concatenate(starts)
    if offsets[-1] != size:  # last line has no trailing newline
        offsets = np.append(offsets, size)
    return offsets


class JsonlDocs:
    """Documents of one source read from the JSONL file on demand (streaming strategy); only the line offsets are
    cached (prepare/survey.py).

    A line longer than the encoder's limit is never read (its size is known from the offsets) unless it is to be cut.
    A .gz file cannot be read at an offset: the pipeline prepares it as shards instead.
    """

    def __init__(self, path: Path, encoder: DocEncoder, *, offsets: np.ndarray | None = None) -> None:
        assert not is_gzip(path), "gzip has no random access: .gz sources are prepared as shards"
        self.name = str(path)
        self.path = path
        self.encoder = encoder
        self.offsets = scan_line_offsets(path) if offsets is None else offsets  # given: surveyed (prepare/survey.py)
        with path.open("rb") as handle:  # only the last line may lack its "\n"
            handle.seek(max(int(self.offsets[-1]) - 1, 0))
            self._ends_with_newline = handle.read(1) == b"\n"
        self.lengths: np.ndarray | None = None  # unknown until tokenized
        self._handle: BinaryIO | None = None
        self._handle_pid = 0  # a forked loader worker must not share its parent's file position

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_handle": None}  # each loader worker opens its own handle

    def read_lines(self, indices: Sequence[int]) -> list[tuple[int, bytes | LongLine]]:
        """Raw bytes of the given documents (a LongLine past the limit), with 1-based line numbers."""
        if self._handle is None or self._handle_pid != os.getpid():
            self._handle, self._handle_pid = self.path.open("rb"), os.getpid()
        out: list[tuple[int, bytes | LongLine]] = []
        limit = self.encoder.limit
        for index in indices:
            start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
            size = stop - start - (index < len(self) - 1 or self._ends_with_newline)
            self._handle.seek(start)
            if size > limit.max_bytes and not limit.truncate:
                out.append((index + 1, LongLine(size=size, head=self._handle.read(min(size, HEAD_BYTES)))))
                meter.read(min(size, HEAD_BYTES))
            else:
                out.append((index + 1, self._handle.read(stop - start)))
                meter.read(stop - start)
        return out

    def fetch(self, indices: Sequence[int]) -> list[EncodedDoc | SkippedLine | None]:
        """Read and encode the given documents."""
        return self.encoder.encode_lines(self.read_lines([int(i) for i in indices]))


class TableDocs:
    """Documents of one table source read on demand (streaming strategy), like JsonlDocs for a JSONL file."""

    def __init__(self, name: str, table: RowTable, encoder: DocEncoder) -> None:
        self.name = name
        self.table = table
        self.encoder = encoder
        self.nbytes = table.nbytes
        self.lengths: np.ndarray | None = None  # unknown until tokenized (data/prepare/lengths.py)

    def __len__(self) -> int:
        return len(self.table)

    def fetch(self, indices: Sequence[int]) -> list[EncodedDoc | SkippedLine | None]:
        """Read and encode the given rows."""
        indices = [int(i) for i in indices]
        rows = self.table.take(indices)
        return self.encoder.encode_lines([(i + 1, Row(row)) for i, row in zip(indices, rows, strict=True)])
