from __future__ import annotations

import itertools
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from lumina_ds.data.prepare import tokenize as prepare_module
from lumina_ds.data.prepare.documents import DocEncoder, labels_of, scan_line_offsets
from lumina_ds.data.prepare.tokenize import EncodeSettings, byte_ranges, prepare_source, tokenize_source
from lumina_ds.data.records.sources import parse_train_data
from lumina_ds.errors import ConfigError, DataError
from lumina_ds.tokenizer import ChatTemplate, ChatTokenizer
from tests.helpers import encode_messages, read_conversations


def _mixed_file(examples_dir: Path, tmp_path: Path, copies: int = 3) -> Path:
    """Good conversations with the bad-lines fixture spliced in several times (bad lines in every byte range)."""
    good = (examples_dir / "conversations.jsonl").read_bytes().splitlines(keepends=True)
    bad = (examples_dir / "bad_lines.jsonl").read_bytes().splitlines(keepends=True)
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"".join(good[:100] + bad[1:] + good[100:]) * copies)
    return path


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_batched_encoder_equals_the_chat_template(tokenizer: ChatTokenizer, examples_dir: Path, train_on: str) -> None:
    conversations = read_conversations(examples_dir / "conversations_eval.jsonl").conversations
    encoder = DocEncoder(tokenizer, train_on=train_on)
    for messages in conversations:
        ids, labels = ChatTemplate().encode_conversation(messages, tokenizer, train_on=train_on)
        doc_ids, targets = encode_messages(encoder, messages)
        assert doc_ids.tolist() == ids
        assert labels_of(doc_ids, targets).tolist() == labels


def test_line_offsets_number_lines_like_iterating_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n\n  \n{"b": 2}')  # blank lines and no trailing newline
    offsets = scan_line_offsets(path, block_bytes=4)  # blocks smaller than a line
    with path.open("rb") as handle:
        lines = list(handle)
    assert len(offsets) - 1 == len(lines) == 4
    raw = path.read_bytes()
    assert [raw[a:b] for a, b in itertools.pairwise(offsets)] == lines


def test_byte_ranges_start_at_line_starts_and_cover_the_file(examples_dir: Path, tmp_path: Path) -> None:
    path = _mixed_file(examples_dir, tmp_path)
    ranges = byte_ranges(path, target_bytes=10_000)
    raw = path.read_bytes()
    assert ranges[0][0] == 0 and ranges[-1][1] == len(raw) and len(ranges) > 10
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert all(raw[start - 1 : start] == b"\n" for start, _ in ranges[1:])


def test_parallel_tokenization_equals_one_process(
    tokenizer: ChatTokenizer, examples_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _mixed_file(examples_dir, tmp_path)
    settings = EncodeSettings.of(tokenizer)
    single, single_report = tokenize_source(path, settings, num_workers=1)
    monkeypatch.setattr(prepare_module, "IN_PROCESS_BYTES", 0)  # force the spawned worker pool on a small file
    parallel, report = tokenize_source(path, settings, num_workers=2, shard_bytes=20_000)
    assert len(parallel.parts) > 1
    assert parallel.lengths.tolist() == single.lengths.tolist()
    for index in range(len(single)):
        a, b = single.doc(index), parallel.doc(index)
        assert (a is None and b is None) or (a is not None and b is not None and (a[0] == b[0]).all())
    # the same lines are used and skipped as by the training reader, with line numbers across byte ranges
    reference = read_conversations(path)
    lines = path.read_bytes().count(b"\n")
    assert (report.lines, report.conversations) == (lines, len(reference.conversations))
    assert report.skipped == len(reference.skipped) >= 3 * 10
    assert [s.line_no for s in report.skipped_examples] == [s.line_no for s in reference.skipped][:20]
    assert single_report.skipped_examples == report.skipped_examples
    raw_lines = path.read_bytes().splitlines()
    first = report.skipped_examples[0]
    assert raw_lines[first.line_no - 1] == (examples_dir / "bad_lines.jsonl").read_bytes().splitlines()[1]


def test_strict_stops_at_the_first_bad_line_with_its_code(
    tokenizer: ChatTokenizer, examples_dir: Path, tmp_path: Path
) -> None:
    path = _mixed_file(examples_dir, tmp_path)
    with pytest.raises(DataError) as err:
        tokenize_source(path, EncodeSettings.of(tokenizer, strict=True), shard_bytes=20_000)
    assert err.value.code == "E101" and "line 101:" in err.value.message


def test_prepared_shards_are_cached_by_content_and_settings(
    tokenizer: ChatTokenizer, examples_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes((examples_dir / "conversations_eval.jsonl").read_bytes())
    settings = EncodeSettings.of(tokenizer)
    cache = tmp_path / "prepared"
    docs, report = prepare_source(path, settings, prepared_dir=cache)
    assert not report.cached and report.conversations == 50
    again, report2 = prepare_source(path, settings, prepared_dir=cache)
    assert report2.cached and again.lengths.tolist() == docs.lengths.tolist()
    assert isinstance(again.parts[0].tokens, np.memmap)
    in_ram, _ = tokenize_source(path, settings)
    assert in_ram.lengths.tolist() == docs.lengths.tolist()
    assert len(list(cache.glob("data-*"))) == 1
    prepare_source(path, EncodeSettings.of(tokenizer, train_on="all"), prepared_dir=cache)  # template change
    with path.open("ab") as handle:  # content change
        handle.write((examples_dir / "conversations.jsonl").read_bytes().splitlines(keepends=True)[0])
    changed, report3 = prepare_source(path, settings, prepared_dir=cache)
    assert not report3.cached and len(changed) == 51
    assert len(list(cache.glob("data-*"))) == 3


def test_corrupt_shard_and_unwritable_cache_are_reported(
    tokenizer: ChatTokenizer, examples_dir: Path, tmp_path: Path
) -> None:
    path = examples_dir / "conversations_eval.jsonl"
    settings = EncodeSettings.of(tokenizer)
    prepare_source(path, settings, prepared_dir=tmp_path / "cache")
    (shard_dir,) = (tmp_path / "cache").glob("conversations_eval-*")
    tokens = next(shard_dir.glob("*.tokens.npy"))
    tokens.write_bytes(tokens.read_bytes()[:200])  # truncated file
    with pytest.raises(DataError) as err:
        prepare_source(path, settings, prepared_dir=tmp_path / "cache")
    assert err.value.code == "E109" and str(shard_dir) in err.value.hint
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DataError) as err:
        prepare_source(path, settings, prepared_dir=blocker / "cache")
    assert err.value.code == "E108"


def test_train_data_spec_with_weights(examples_dir: Path) -> None:
    a, b = examples_dir / "conversations.jsonl", examples_dir / "bad_lines.jsonl"
    specs = parse_train_data(f"{a}, {b}:0.25")
    assert [(s.source.local, s.weight) for s in specs] == [(a, 1.0), (b, 0.25)]
    with pytest.raises(DataError) as missing:
        parse_train_data(f"{a},nope.jsonl:2")
    assert missing.value.code == "E104" and "nope.jsonl" in missing.value.message
    with pytest.raises(ConfigError):
        parse_train_data(f"{a}:0")
    assert json.loads(json.dumps([s.source.location for s in specs]))  # plain names, serialisable


def test_the_next_build_removes_temp_dirs_of_killed_builds_on_this_host(
    tokenizer: ChatTokenizer, examples_dir: Path, tmp_path: Path
) -> None:
    path = examples_dir / "conversations_eval.jsonl"
    settings = EncodeSettings.of(tokenizer)
    cache = tmp_path / "cache"
    cache.mkdir()
    name = f"conversations_eval-{prepare_module.cache_key(path, settings, memo_dir=cache)}"
    dead = cache / f".{name}.{socket.gethostname()}.999999999.0badf00d.tmp"  # this host, no such process
    other_host = cache / f".{name}.elsewhere.1.0badf00d.tmp"  # another node may be building it right now
    for directory in (dead, other_host):
        directory.mkdir()
        (directory / "part-00000.tokens.npy").write_bytes(b"partial")
    _, report = prepare_source(path, settings, prepared_dir=cache)
    assert not report.cached and (cache / name / "meta.json").is_file()
    assert not dead.exists() and other_host.exists()


def test_temp_names_differ_even_for_the_same_host_and_pid(tmp_path: Path) -> None:
    """Containers sharing a file system repeat pids (and can repeat host names): a pid alone collided."""
    target = tmp_path / "meta.json"
    names = {prepare_module.temp_path(target).name for _ in range(50)}
    assert len(names) == 50
    assert all(n.startswith(f".meta.json.{socket.gethostname()}.{os.getpid()}.") and n.endswith(".tmp") for n in names)
