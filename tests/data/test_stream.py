from __future__ import annotations

import os
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from lumina_ds.batch import IGNORE_INDEX, Batch
from lumina_ds.data.loading.global_order import row_starts
from lumina_ds.data.loading.mixture import Mixture
from lumina_ds.data.loading.stream import PackedBatches, RankView, RowPacker, build_row
from lumina_ds.data.prepare.documents import DocEncoder, JsonlDocs
from lumina_ds.data.prepare.lengths import count_tokens
from lumina_ds.data.prepare.tokenize import EncodeSettings, prepare_source, tokenize_source
from lumina_ds.data.records.types import SkippedLine
from lumina_ds.errors import DataError
from lumina_ds.tokenizer import ChatTokenizer

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
def test_global_row_boundaries_pack_exactly_as_the_packer(seed: int) -> None:
    """row_starts places rows from lengths alone; the rows built from them equal RowPacker's, padding and cuts too."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 40, size=200)
    lengths[rng.integers(0, 200, size=10)] = 100  # some longer than a row
    items = [None if n == 0 else _doc(1000 * i, int(n)) for i, n in enumerate(lengths)]
    packed = _pack(items, 32)
    starts = row_starts(lengths, 32)
    assert len(starts) - 1 == len(packed)
    for row, begin, end in zip(packed, starts[:-1], starts[1:], strict=True):
        ids, labels, positions = build_row([d for d in items[begin:end] if d is not None], seq_len=32, pad_id=PAD)
        assert (ids == row.input_ids).all() and (labels == row.labels).all() and (positions == row.position_ids).all()


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
    streaming = [JsonlDocs(p, DocEncoder(tokenizer)) for p in paths]
    for source in streaming:  # streamed files count their tokens once (data/lengths.py)
        count_tokens(source, num_workers=2)
    return {
        "memory": [tokenize_source(p, settings)[0] for p in paths],
        "sharded": [prepare_source(p, settings, prepared_dir=cache, shard_bytes=4096)[0] for p in paths],
        "streaming": streaming,
    }


def _batches(sources: list, *, rank: int = 0, world: int = 1, workers: int = 0, seq_len: int = 96,
             seed: int = 11) -> PackedBatches:  # fmt: skip
    mixture = Mixture([len(s) for s in sources], [1.0, 2.0], seed=seed)
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
    for k in (1, 5, 14):  # 14 batches of rank 1 of 2 (56 rows) end past the end of epoch 0
        first = _batches(sources[strategy], rank=1, world=2, workers=workers)
        seen = _take(first, k)
        state = first.state_dict()
        resumed = _batches(sources[strategy], rank=1, world=2, workers=workers)
        resumed.load_state_dict(state)
        assert _same(seen + _take(resumed, 24 - k), uninterrupted)
    assert first.epoch >= 0 and resumed.epoch >= 1


def test_ranks_share_out_the_one_rank_stream_micro_batch_by_micro_batch(sources: dict) -> None:
    """Rank r of W takes global micro-batches r, r + W, ...: interleaved, 2 ranks (streamed with 2 workers each) are
    the 1-rank stream, so 2 ranks x 1 micro-batch and 1 rank x 2 accumulated micro-batches train on the same rows."""
    one = _take(_batches(sources["memory"]), 40)  # several epochs
    for source in sources["streaming"]:  # the training process has read from the file before its workers fork
        source.fetch(range(len(source)))
    ranks = [_take(_batches(sources["streaming"], rank=r, world=2, workers=2), 20) for r in range(2)]
    assert _same([b for pair in zip(*ranks, strict=True) for b in pair], one)


def test_an_epoch_of_global_rows_holds_every_document_once(sources: dict) -> None:
    memory = sources["memory"]
    batches = _batches(memory)
    rows = batches.rows
    mixture = batches.view.mixture
    docs = np.concatenate([rows.docs((0, k)) for k in range(rows.rows_in_epoch(0))])
    with_tokens = [d for d in mixture.epoch_order(0).tolist() if rows.lengths[d] > 0]
    assert docs.tolist() == with_tokens  # in the mixture's order, nothing skipped or repeated
    assert len(with_tokens) < len(mixture.epoch_order(0))  # the bad lines (no tokens) are in no row


def test_a_position_saved_by_two_ranks_resumes_on_one_at_the_next_global_row(sources: dict) -> None:
    memory = sources["memory"]
    one = _take(_batches(memory), 40)
    pair = [_batches(memory, rank=r, world=2) for r in range(2)]
    for batches in pair:
        _take(batches, 14)  # 14 steps of 2 ranks x 2 rows: 56 rows, past the end of epoch 0
    states = [b.state_dict() for b in pair]
    assert states[0] == states[1]  # one global position, whichever rank wrote it
    resumed = _batches(memory)
    resumed.load_state_dict(states[1])
    assert (states[0]["epoch"], states[0]["row"]) == resumed.rows.advance((0, 0), 56)
    assert resumed.rows.rows_in_epoch(0) < 56 and resumed.epoch == 1  # the position is in the second epoch
    assert _same(_take(resumed, 12), one[28:40])  # 1 rank takes the 2 ranks' 28 micro-batches' successors


def test_resume_with_different_data_seed_or_rows_is_refused(sources: dict) -> None:
    state = _batches(sources["memory"], rank=0, world=2).state_dict()
    for other in (_batches(sources["memory"], seq_len=64), _batches(sources["memory"], seed=12)):
        with pytest.raises(DataError) as err:
            other.load_state_dict(state)
        assert err.value.code == "E107"
    per_rank = {"epoch": 0, "index": 12, "fingerprint": {**state["fingerprint"], "world_size": 2}}  # before global rows
    with pytest.raises(DataError) as err:
        _batches(sources["memory"]).load_state_dict(per_rank)
    assert err.value.code == "E107" and "per rank" in err.value.message


def test_more_ranks_than_conversations_is_refused(sources: dict) -> None:
    with pytest.raises(DataError) as err:
        _batches(sources["memory"], world=128)  # 50 + 2 x 16 lines per epoch
    assert err.value.code == "E105"


def _read_everything(source: JsonlDocs, rounds: int) -> None:
    expected = [raw for _, raw in source.read_lines(range(len(source)))]
    same = all([raw for _, raw in source.read_lines(range(len(source)))] == expected for _ in range(rounds))
    os._exit(0 if same else 1)


def test_a_forked_loader_worker_reads_through_its_own_file_handle(tokenizer: ChatTokenizer, examples_dir: Path) -> None:
    """A worker forked after the training process read the file used to share its file position: concurrent seeks
    and reads returned other lines' bytes (a forked process inherits the source as it is, open handle included)."""
    import multiprocessing

    source = JsonlDocs(examples_dir / "conversations.jsonl", DocEncoder(tokenizer))
    source.read_lines([0])  # the parent holds an open handle when the workers fork
    workers = [
        multiprocessing.get_context("fork").Process(target=_read_everything, args=(source, 30)) for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
