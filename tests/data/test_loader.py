from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from lumina_ds.data import (
    BatchIterator,
    ChatTokenizer,
    PackedRows,
    ShardedSampler,
    build_datasets,
    load_chat_dataset,
)
from lumina_ds.errors import DataError


def _rows(n: int, seq_len: int = 4) -> PackedRows:
    """Rows whose every token is the row number, so a batch reveals which rows it holds."""
    ids = np.repeat(np.arange(n, dtype=np.int32)[:, None], seq_len, axis=1)
    return PackedRows(input_ids=ids, labels=ids.copy(), position_ids=np.zeros_like(ids), doc_ids=np.zeros_like(ids))


def _row_numbers(batch: dict[str, torch.Tensor]) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def _iterator(
    n: int = 23, *, rank: int = 0, world_size: int = 1, mbs: int = 3, epochs: int | None = None
) -> BatchIterator:
    sampler = ShardedSampler(n, rank=rank, world_size=world_size, seed=5)
    return BatchIterator(_rows(n), sampler, micro_batch_size=mbs, num_epochs=epochs)


def test_batches_are_long_tensors_and_drop_the_tail() -> None:
    it = _iterator(23, mbs=3, epochs=1)
    batches = list(it)
    assert it.batches_per_epoch == 7 and len(batches) == 7
    assert set(batches[0]) == {"input_ids", "labels", "position_ids"}
    assert all(t.dtype == torch.long and t.shape == (3, 4) for t in batches[0].values())
    order = ShardedSampler(23, seed=5).epoch_indices().tolist()
    assert [r for b in batches for r in _row_numbers(b)] == order[:21]


def test_epochs_advance_and_stop_at_num_epochs() -> None:
    it = _iterator(10, mbs=2, epochs=3)
    seen = [_row_numbers(b) for b in it]
    assert len(seen) == 15 and it.epoch == 3
    epochs = [sorted(r for b in seen[i : i + 5] for r in b) for i in range(0, 15, 5)]
    assert epochs == [list(range(10))] * 3
    assert seen[:5] != seen[5:10]


@pytest.mark.parametrize("stop_after", [2, 7, 8, 9, 15])
def test_resume_matches_uninterrupted_run(stop_after: int) -> None:
    reference = [_row_numbers(b) for b in islice(_iterator(23, mbs=3), 20)]
    first = _iterator(23, mbs=3)
    head = [_row_numbers(b) for b in islice(iter(first), stop_after)]
    state = first.state_dict()
    resumed = _iterator(23, mbs=3)
    resumed.load_state_dict(state)
    tail = [_row_numbers(b) for b in islice(iter(resumed), 20 - stop_after)]
    assert head + tail == reference
    assert resumed.epoch == (19 // 7)


def test_ranks_step_together_on_disjoint_rows() -> None:
    ranks = [_iterator(23, rank=r, world_size=2, mbs=2, epochs=1) for r in range(2)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == 5
    rows = [[r for b in it for r in _row_numbers(b)] for it in ranks]
    assert len(rows[0]) == len(rows[1]) == 10
    assert not set(rows[0]) & set(rows[1])


def test_micro_batch_larger_than_shard_is_e105() -> None:
    with pytest.raises(DataError) as info:
        _iterator(7, world_size=2, mbs=4)
    assert info.value.code == "E105"


def test_load_chat_dataset_counts(tokenizer: ChatTokenizer, examples_dir: Path) -> None:
    data = load_chat_dataset(examples_dir / "conversations.jsonl", tokenizer=tokenizer, seq_len=256)
    rows = data.rows
    assert data.num_conversations == rows.num_conversations == 480 and data.skipped == []
    assert data.num_tokens == int((rows.doc_ids >= 0).sum())
    assert 0 < data.num_target_tokens < data.num_tokens
    every = load_chat_dataset(examples_dir / "conversations.jsonl", tokenizer=tokenizer, seq_len=256, train_on="all")
    assert every.num_target_tokens == every.num_tokens - 480 + every.rows.truncated
    batch = next(iter(BatchIterator(rows, ShardedSampler(len(rows)), micro_batch_size=4)))
    assert batch["input_ids"].shape == (4, 256)


def test_build_datasets_reports_skips(tokenizer: ChatTokenizer, examples_dir: Path) -> None:
    train, evaluation = build_datasets(
        examples_dir / "bad_lines.jsonl", examples_dir / "conversations_eval.jsonl", tokenizer=tokenizer, seq_len=64
    )
    assert train.num_conversations == 3 and len(train.skipped) == 12
    assert evaluation is not None and evaluation.num_conversations == 50
    alone, none = build_datasets(examples_dir / "bad_lines.jsonl", tokenizer=tokenizer, seq_len=64)
    assert none is None and alone.num_tokens == train.num_tokens


def test_file_without_usable_lines_is_e106(tokenizer: ChatTokenizer, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": []}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_chat_dataset(path, tokenizer=tokenizer, seq_len=32)
    assert info.value.code == "E106"
    assert "2 of 2 lines skipped" in info.value.message
