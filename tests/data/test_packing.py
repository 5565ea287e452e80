from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lumina_ds.data import IGNORE_INDEX, ChatTemplate, ChatTokenizer, pack_conversations, read_conversations
from lumina_ds.errors import ConfigError

PAD = 0


def _doc(start: int, length: int) -> tuple[list[int], list[int]]:
    """A fake conversation whose ids are start..start+length-1, every next token a target."""
    ids = list(range(start, start + length))
    return ids, [*ids[1:], IGNORE_INDEX]


def test_packs_in_order_and_opens_rows_when_full() -> None:
    docs = [_doc(100, 3), _doc(200, 4), _doc(300, 2), _doc(400, 5)]
    rows = pack_conversations(docs, seq_len=8, pad_id=PAD)
    assert rows.input_ids.tolist() == [
        [100, 101, 102, 200, 201, 202, 203, PAD],
        [300, 301, 400, 401, 402, 403, 404, PAD],
    ]
    assert rows.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 0, 1, 2, 3, 4, 0]]
    assert rows.doc_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, -1], [0, 0, 1, 1, 1, 1, 1, -1]]
    assert rows.labels[0].tolist() == [101, 102, -100, 201, 202, 203, -100, -100]
    assert (rows.truncated, rows.num_conversations, rows.rows_without_targets) == (0, 4, 0)
    assert rows.num_tokens == 14 and rows.num_target_tokens == 10


def test_truncation_is_counted_and_keeps_in_document_target() -> None:
    rows = pack_conversations([_doc(10, 3), _doc(20, 7), _doc(30, 2)], seq_len=5, pad_id=PAD)
    assert rows.truncated == 1
    assert rows.input_ids.tolist() == [[10, 11, 12, PAD, PAD], [20, 21, 22, 23, 24], [30, 31, PAD, PAD, PAD]]
    assert rows.labels[1].tolist() == [21, 22, 23, 24, 25]


def test_rows_without_targets_are_kept_and_counted() -> None:
    no_target = ([7, 8, 9], [IGNORE_INDEX] * 3)
    rows = pack_conversations([no_target, _doc(1, 4)], seq_len=4, pad_id=PAD)
    assert len(rows) == 2
    assert rows.rows_without_targets == 1


def test_empty_input_gives_zero_rows() -> None:
    rows = pack_conversations([], seq_len=16, pad_id=PAD)
    assert rows.input_ids.shape == (0, 16)
    assert rows.num_conversations == 0


def test_seq_len_must_be_at_least_two() -> None:
    with pytest.raises(ConfigError):
        pack_conversations([_doc(1, 3)], seq_len=1, pad_id=PAD)


def test_real_conversations_are_preserved(tokenizer: ChatTokenizer, examples_dir: Path) -> None:
    conversations = read_conversations(examples_dir / "conversations_eval.jsonl").conversations
    encoded = [ChatTemplate().encode_conversation(c, tokenizer) for c in conversations]
    seq_len = max(len(ids) for ids, _ in encoded) + 10
    rows = pack_conversations(encoded, seq_len=seq_len, pad_id=tokenizer.pad_id)
    assert rows.input_ids.shape[1] == seq_len and rows.truncated == 0
    real = rows.doc_ids >= 0
    assert rows.input_ids[real].tolist() == [t for ids, _ in encoded for t in ids]
    assert rows.labels[real].tolist() == [t for _, labels in encoded for t in labels]
    assert (rows.labels[~real] == IGNORE_INDEX).all() and (rows.input_ids[~real] == tokenizer.pad_id).all()
    # Packing is useful: fewer rows than conversations.
    assert len(rows) < len(encoded)
    # Every target predicts the next token of the same document, never the next document's BOS.
    row, col = np.nonzero(rows.labels != IGNORE_INDEX)
    assert (rows.labels[row, col] == rows.input_ids[row, col + 1]).all()
    assert (rows.doc_ids[row, col] == rows.doc_ids[row, col + 1]).all()
    starts = rows.position_ids == 0
    assert (rows.input_ids[starts & real] == tokenizer.bos_id).all()
    assert int((starts & real).sum()) == len(encoded)
