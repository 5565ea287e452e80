"""Data preparation divided among ranks (ranks as threads sharing one directory, or two "nodes" with a directory
each): each rank reads and tokenizes a share of the bytes, at most 1.2 x its fair share plus a constant, and what
they prepare together is exactly what one process prepares, down to the skipped lines and the --strict error."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lumina_ds.config.run import DataConfig
from lumina_ds.data.loading.pipeline import SourceSet, open_sources
from lumina_ds.data.loading.stream import fingerprint_changes
from lumina_ds.data.prepare import content, meter
from lumina_ds.data.prepare.content import content_hash, memo_key
from lumina_ds.data.prepare.documents import scan_line_offsets
from lumina_ds.data.prepare.survey import survey
from lumina_ds.data.prepare.team import Team, team_of
from lumina_ds.data.prepare.tokenize import EncodeSettings
from lumina_ds.data.records.sources import parse_train_data
from lumina_ds.errors import DataError
from lumina_ds.tokenizer import ChatTokenizer
from tests.data.thread_ranks import on_ranks

PIECE = 4096  # hash pieces this small split the small test files between ranks, as 1 MiB pieces split big ones
SLACK = 1.2


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(content, "HASH_PIECE", PIECE)


def corpus(examples_dir: Path, tmp_path: Path) -> dict[str, Path]:
    """Files whose sizes do not divide by 3: bad lines in the middle of good ones, a last line without its newline,
    a .gz (one rank tokenizes it whole), an empty file."""
    good = (examples_dir / "conversations.jsonl").read_bytes().splitlines(keepends=True)
    bad = (examples_dir / "bad_lines.jsonl").read_bytes().splitlines(keepends=True)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b"".join(good[:150] + bad[1:] + good[150:400]))
    tail = tmp_path / "tail.jsonl"
    tail.write_bytes(b"".join(good[400:517]).rstrip(b"\n"))
    packed = tmp_path / "packed.jsonl.gz"
    packed.write_bytes(gzip.compress(b"".join(good[517:600])))
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    return {"mixed": mixed, "tail": tail, "packed": packed, "empty": empty}


def open_on(n: int, files: list[Path], tokenizer: ChatTokenizer, prepared: Path, **data: Any) -> list[Any]:
    specs = parse_train_data(",".join(str(f) for f in files))
    config = DataConfig(num_workers=0, **data)
    settings = EncodeSettings.of(tokenizer, strict=config.strict)
    return on_ranks(n, lambda team: open_sources(specs, settings, config, prepared_dir=prepared, team=team))


def summary(opened: SourceSet) -> list[Any]:
    """Everything the global order and the logs depend on, per source."""
    out = [opened.strategy, opened.contents]
    for docs, report in zip(opened.sources, opened.reports, strict=True):
        out.append((report.lines, report.conversations, report.tokens, report.skipped, report.skipped_examples))
        out.append(np.asarray(docs.lengths).tolist())
    return out


def assert_divided(works: list[meter.Work], alone: meter.Work) -> None:
    """Every byte read and every token encoded once over the ranks, each rank at most its share (plus a constant)."""
    n = len(works)
    assert sum(w.bytes_read for w in works) == alone.bytes_read
    assert sum(w.tokens_encoded for w in works) == alone.tokens_encoded
    for work in works:
        assert work.bytes_read <= SLACK * alone.bytes_read / n + 2 * PIECE
        assert work.tokens_encoded <= SLACK * alone.tokens_encoded / n + 2000  # a line's tokens


def test_offsets_and_hashes_found_by_three_ranks_equal_one_process(examples_dir: Path, tmp_path: Path) -> None:
    files = list(corpus(examples_dir, tmp_path).values())
    offsets_of = {str(f) for f in files if not f.name.endswith(".gz")}
    ((facts, alone),) = on_ranks(1, lambda team: survey(files, offsets_of, team, memo_dir=tmp_path / "one"))
    three = on_ranks(3, lambda team: survey(files, offsets_of, team, memo_dir=tmp_path / "three"))
    for found, _ in three:
        assert found.contents == facts.contents
        assert found.offsets.keys() == facts.offsets.keys() == offsets_of
        for path in offsets_of:
            assert np.array_equal(found.offsets[path], scan_line_offsets(Path(path)))
    assert all(facts.contents[memo_key(f)] == content_hash(f) for f in files)
    assert_divided([work for _, work in three], alone)
    again = on_ranks(3, lambda team: survey(files, offsets_of, team, memo_dir=tmp_path / "three"))
    assert [work.bytes_read for _, work in again] == [0, 0, 0]  # remembered and cached: nothing read again
    assert all(np.array_equal(found.offsets[p], facts.offsets[p]) for found, _ in again for p in offsets_of)


def test_a_file_of_one_piece_keeps_its_plain_hash(tmp_path: Path) -> None:
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    small.write_bytes(b"x" * PIECE)
    big.write_bytes(b"x" * (PIECE + 1))
    assert content_hash(small) == hashlib.blake2b(small.read_bytes(), digest_size=16).hexdigest()  # keys unchanged
    assert content_hash(big).startswith(content.PIECES_PREFIX)


@pytest.mark.parametrize("strategy", ["streaming", "sharded", "memory"])
def test_three_ranks_prepare_what_one_process_prepares(
    tokenizer: ChatTokenizer, examples_dir: Path, tmp_path: Path, strategy: str
) -> None:
    files = list(corpus(examples_dir, tmp_path).values())
    ((alone, alone_work),) = open_on(1, files, tokenizer, tmp_path / "one", strategy=strategy)
    three = open_on(3, files, tokenizer, tmp_path / "three", strategy=strategy)
    for opened, _ in three:
        assert summary(opened) == summary(alone)
        for mine, theirs in zip(opened.sources, alone.sources, strict=True):
            ids = list(range(len(theirs)))
            assert [str(d) for d in mine.fetch(ids)] == [str(d) for d in theirs.fetch(ids)]
    if strategy == "memory":  # read into RAM, not memory-mapped
        assert all(not isinstance(p.tokens, np.memmap) for docs in three[0][0].sources for p in docs.parts)
    if strategy != "memory":  # the one process of the memory strategy tokenizes in RAM: nothing to compare here
        assert_divided([work for _, work in three], alone_work)
    again = open_on(3, files, tokenizer, tmp_path / "three", strategy=strategy)
    assert all(report.cached for opened, _ in again for report in opened.reports)
    assert [work.tokens_encoded for _, work in again] == [0, 0, 0]


@pytest.mark.parametrize("strategy", ["streaming", "sharded"])
def test_a_bad_line_under_strict_is_the_same_error_on_every_rank(
    tokenizer: ChatTokenizer, examples_dir: Path, tmp_path: Path, strategy: str
) -> None:
    files = [corpus(examples_dir, tmp_path)["mixed"]]
    with pytest.raises(DataError) as alone:
        open_on(1, files, tokenizer, tmp_path / "one", strategy=strategy, strict=True)
    errors = []
    specs = parse_train_data(str(files[0]))
    config = DataConfig(num_workers=0, strategy=strategy, strict=True)
    settings = EncodeSettings.of(tokenizer, strict=True)

    def rank(team: Team) -> None:
        try:
            open_sources(specs, settings, config, prepared_dir=tmp_path / "three", team=team)
        except DataError as exc:
            errors.append((exc.code, exc.message))

    on_ranks(3, rank)
    assert errors == [(alone.value.code, alone.value.message)] * 3  # nobody left waiting in a collective
    assert "line 151" in alone.value.message  # the first bad line, numbered as in the file


def test_nodes_with_their_own_directories_each_prepare_a_copy(
    tokenizer: ChatTokenizer, examples_dir: Path, tmp_path: Path
) -> None:
    files = list(corpus(examples_dir, tmp_path).values())
    specs = parse_train_data(",".join(str(f) for f in files))
    config = DataConfig(num_workers=0, strategy="streaming")
    settings = EncodeSettings.of(tokenizer)
    ((alone, _),) = open_on(1, files, tokenizer, tmp_path / "one", strategy="streaming")
    nodes = [0, 0, 2, 2]  # two nodes of two ranks, numbered node by node

    def rank(team: Team) -> SourceSet:
        mine = team_of(team.rank, nodes, shared=False, all_gather=team.all_gather)
        assert mine.size == 2
        own = tmp_path / f"node{nodes[team.rank]}"  # the same path on each node, another disk
        return open_sources(specs, settings, config, prepared_dir=own, team=mine)

    results = on_ranks(4, rank)
    assert all(summary(opened) == summary(alone) for opened, _ in results)
    for node in ("node0", "node2"):
        assert len(list((tmp_path / node / "token-counts").glob("*.json"))) == 3  # each node has its own cache


def test_a_checkpoint_hashed_whole_names_the_way_to_resume(tmp_path: Path) -> None:
    old = hashlib.blake2b(b"", digest_size=16).hexdigest()
    (change,) = fingerprint_changes({"content": [["a.jsonl", old]]}, {"content": [["a.jsonl", "p1m:0123"]]})
    assert "hashed files over 1 MiB whole" in change and "--allow-changed-data" in change
    (change,) = fingerprint_changes({"content": [["a.jsonl", old]]}, {"content": [["a.jsonl", "0123"]]})
    assert "--allow-changed-data" not in change  # an edited file is only a change
