from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from lumina_ds.batch import Batch
from lumina_ds.data import (
    IGNORE_INDEX,
    ChatTokenizer,
    DocEncoder,
    EncodeSettings,
    JsonlDocs,
    Mixture,
    SkippedLine,
    prepare_source,
    tokenize_source,
)
from lumina_ds.data.stream import PackedBatches, RankView, RowPacker, count_rows, iterate_chunks
from lumina_ds.errors import DataError

PAD = 0


def _doc(start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """A fake conversation with ids start..start+length-1, every next token a target."""
    targets = np.ones(length, dtype=np.uint8)
    targets[-1] = 0
    return np.arange(start, start + length, dtype=np.int32), targets


def _pack(items: list, seq_len: int, epoch: int = 0) -> list:
    return list(RowPacker(seq_len=seq_len, pad_id=PAD).rows(iter([(epoch, 0, items)])))


def test_packs_in_order_and_opens_a_row_when_the_next_document_does_not_fit() -> None:
    rows = _pack([_doc(100, 3), _doc(200, 4), None, _doc(300, 2), _doc(400, 5)], seq_len=8)
    assert [r.input_ids.tolist() for r in rows] == [
        [100, 101, 102, 200, 201, 202, 203, PAD],
        [300, 301, 400, 401, 402, 403, 404, PAD],
    ]
    assert [r.position_ids.tolist() for r in rows] == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 0, 1, 2, 3, 4, 0]]
    assert rows[0].labels.tolist() == [101, 102, -100, 201, 202, 203, -100, -100]
    # the second row starts at document 3 (document 2 is an empty line); the last row ends the finite input
    assert [r.next_start for r in rows] == [(0, 3), (1, 0)]


def test_a_long_document_is_truncated_and_keeps_its_in_document_target() -> None:
    rows = _pack([_doc(10, 3), _doc(20, 7), _doc(30, 2)], seq_len=5)
    assert [r.input_ids.tolist() for r in rows] == [
        [10, 11, 12, PAD, PAD],
        [20, 21, 22, 23, 24],
        [30, 31, PAD, PAD, PAD],
    ]
    assert rows[1].labels.tolist() == [21, 22, 23, 24, 25]
    assert [r.next_start for r in rows] == [(0, 1), (0, 2), (1, 0)]


def test_an_epoch_always_starts_a_new_row() -> None:
    chunks = iter([(0, 0, [_doc(1, 2)]), (1, 0, [_doc(5, 2)])])
    rows = list(RowPacker(seq_len=8, pad_id=PAD).rows(chunks))
    assert [r.input_ids[:3].tolist() for r in rows] == [[1, 2, PAD], [5, 6, PAD]]
    assert rows[0].next_start == (1, 0)


def test_skipped_lines_are_counted_or_stop_a_strict_run() -> None:
    bad = SkippedLine(7, "E102", "object has no 'messages' field")
    packer = RowPacker(seq_len=8, pad_id=PAD)
    rows = list(packer.rows(iter([(0, 0, [bad, _doc(1, 3), bad])])))
    assert len(rows) == 1 and packer.skipped == 2
    with pytest.raises(DataError) as err:
        list(RowPacker(seq_len=8, pad_id=PAD, strict=True).rows(iter([(0, 0, [_doc(1, 3), bad])])))
    assert err.value.code == "E102" and "line 7" in err.value.message


@pytest.mark.parametrize("seed", range(5))
def test_count_rows_predicts_the_packer(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 40, size=200)
    lengths[rng.integers(0, 200, size=10)] = 100  # some longer than a row
    items = [None if n == 0 else _doc(1, int(n)) for n in lengths]
    assert count_rows(lengths, 32) == len(_pack(items, 32))


def test_rows_hold_every_token_and_target_of_real_conversations(tokenizer: ChatTokenizer, examples_dir: Path) -> None:
    docs, _ = tokenize_source(examples_dir / "conversations_eval.jsonl", EncodeSettings.of(tokenizer))
    rows = _pack(docs.fetch(range(len(docs))), seq_len=int(docs.lengths.max()) + 10)
    ids = np.stack([r.input_ids for r in rows])
    labels = np.stack([r.labels for r in rows])
    positions = np.stack([r.position_ids for r in rows])
    real = ~((ids == tokenizer.pad_id) & (positions == 0))
    assert int(real.sum()) == docs.num_tokens and len(rows) < len(docs)  # packing helps
    row, col = np.nonzero(labels != IGNORE_INDEX)
    assert (labels[row, col] == ids[row, col + 1]).all()  # a target is the next token of the same document
    assert (positions[row, col + 1] == positions[row, col] + 1).all()
    assert int(((positions == 0) & real).sum()) == len(docs) == int((ids == tokenizer.bos_id).sum())


# ---- the three strategies, ranks, workers and resume ------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tokenizer: ChatTokenizer, examples_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same two files (one with bad lines, weight 2) opened by each strategy."""
    settings = EncodeSettings.of(tokenizer)
    paths = [examples_dir / "conversations_eval.jsonl", examples_dir / "bad_lines.jsonl"]
    cache = tmp_path_factory.mktemp("prepared")
    return {
        "memory": [tokenize_source(p, settings)[0] for p in paths],
        "sharded": [prepare_source(p, settings, prepared_dir=cache, shard_bytes=4096)[0] for p in paths],
        "streaming": [JsonlDocs(p, DocEncoder(tokenizer)) for p in paths],
    }


def _batches(sources: list, *, rank: int = 0, world: int = 1, workers: int = 0, seq_len: int = 96) -> PackedBatches:
    mixture = Mixture([len(s) for s in sources], [1.0, 2.0], seed=11)
    view = RankView(sources, mixture, rank=rank, world_size=world)
    return PackedBatches(view, seq_len=seq_len, pad_id=PAD, micro_batch_size=2, num_workers=workers)


def _take(batches: PackedBatches, n: int) -> list[dict[str, torch.Tensor]]:
    return list(islice(iter(batches), n))


def _same(a: list[Batch], b: list[Batch]) -> bool:
    pairs = (zip(x, y, strict=True) for x, y in zip(a, b, strict=True))
    return len(a) == len(b) and all(torch.equal(u, v) for pair in pairs for u, v in pair)


def test_memory_sharded_and_streaming_yield_the_same_token_stream(sources: dict) -> None:
    for rank in range(2):
        reference = _take(_batches(sources["memory"], rank=rank, world=2), 30)  # several epochs
        assert _same(_take(_batches(sources["sharded"], rank=rank, world=2), 30), reference)
        assert _same(_take(_batches(sources["streaming"], rank=rank, world=2, workers=2), 30), reference)


@pytest.mark.parametrize("strategy", ["memory", "sharded", "streaming"])
def test_resume_continues_with_the_next_unseen_batch(sources: dict, strategy: str) -> None:
    workers = 2 if strategy == "streaming" else 0
    uninterrupted = _take(_batches(sources[strategy], rank=1, world=2, workers=workers), 24)
    for k in (1, 5, 11):  # 11 batches cross an epoch boundary
        first = _batches(sources[strategy], rank=1, world=2, workers=workers)
        seen = _take(first, k)
        state = first.state_dict()
        resumed = _batches(sources[strategy], rank=1, world=2, workers=workers)
        resumed.load_state_dict(state)
        assert _same(seen + _take(resumed, 24 - k), uninterrupted)
    assert first.epoch >= 0 and resumed.epoch >= 1


def _chunk_docs(view: RankView, workers: int) -> Iterator[tuple[int, int, list]]:
    """(epoch, global doc id, item) of every document the rank receives in epoch 0."""
    for epoch, first, items in iterate_chunks(view, (0, 0), num_workers=workers, chunk_docs=7):
        if epoch > 0:
            return
        for offset, item in enumerate(items):
            yield epoch, int(view.docs(epoch)[first + offset]), item


def test_two_ranks_and_two_workers_cover_every_document_once_per_epoch(sources: dict) -> None:
    streaming = sources["streaming"]
    mixture = Mixture([len(s) for s in streaming], [1.0, 2.0], seed=11)
    seen: list[int] = []
    for rank in range(2):
        view = RankView(streaming, mixture, rank=rank, world_size=2)
        received = list(_chunk_docs(view, workers=2))
        assert [doc for _, doc, _ in received] == view.docs(0).tolist()  # in order, nothing skipped or repeated
        for _, doc, item in received:  # and each is the document it claims to be
            source, local = mixture.locate(doc)
            (expected,) = streaming[source].fetch([local])
            assert type(item) is type(expected)
            if isinstance(item, tuple):
                assert (item[0] == expected[0]).all()
        seen += [doc for _, doc, _ in received]
    assert sorted(seen) == sorted(mixture.epoch_order(0).tolist())


def test_resume_with_different_data_or_ranks_is_refused(sources: dict) -> None:
    state = _batches(sources["memory"], rank=0, world=2).state_dict()
    with pytest.raises(DataError) as err:
        _batches(sources["memory"], rank=0, world=1).load_state_dict(state)
    assert err.value.code == "E107"


def test_more_ranks_than_conversations_is_refused(sources: dict) -> None:
    with pytest.raises(DataError) as err:
        _batches(sources["memory"], world=128)  # 50 + 2 x 16 lines per epoch
    assert err.value.code == "E105"
