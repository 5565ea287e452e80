""".jsonl.gz is read wherever a JSONL is: the reader, validate-data (and its repair), tokenizing and prepared shards,
every training strategy, mixing, the tokenizer sample and evaluation data, with the same result as the plain file."""

from __future__ import annotations

import gzip
import json
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from lumina_ds.batch import Batch
from lumina_ds.cli import main
from lumina_ds.config.run import DataConfig
from lumina_ds.data import sample_texts
from lumina_ds.data.loading.pipeline import build_batches, eval_rows, open_sources
from lumina_ds.data.prepare import tokenize as prepare_module
from lumina_ds.data.prepare.tokenize import EncodeSettings, prepare_source, tokenize_source
from lumina_ds.data.records.sources import parse_train_data
from lumina_ds.tokenizer import ChatTokenizer
from tests.helpers import read_conversations


def _gzip(source: Path, target: Path) -> Path:
    target.write_bytes(gzip.compress(source.read_bytes()))
    return target


@pytest.fixture
def mixed(examples_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Good conversations with the bad-lines fixture spliced in, plain and gzip-compressed."""
    good = (examples_dir / "conversations.jsonl").read_bytes().splitlines(keepends=True)
    bad = (examples_dir / "bad_lines.jsonl").read_bytes().splitlines(keepends=True)
    plain = tmp_path / "mixed.jsonl"
    plain.write_bytes(b"".join(good[:100] + bad[1:] + good[100:]) * 2)
    return plain, _gzip(plain, tmp_path / "mixed.jsonl.gz")


def test_reader_and_validation_see_the_same_lines(examples_dir: Path, tmp_path: Path) -> None:
    plain = examples_dir / "validation_errors.jsonl"
    gz = _gzip(plain, tmp_path / "errors.jsonl.gz")
    a, b = read_conversations(plain), read_conversations(gz)
    assert (a.conversations, a.skipped, a.total_lines) == (b.conversations, b.skipped, b.total_lines)
    assert len(b.skipped) == 21
    reports = []
    for path in (plain, gz):
        assert main(["validate-data", str(path), "--report", str(tmp_path / "report.json")]) == 1
        report = json.loads((tmp_path / "report.json").read_text())
        reports.append({**report, "files": None, "issues": [{**i, "file": None} for i in report["issues"]]})
    assert reports[0] == reports[1] and reports[1]["errors"]["role_order"] == 5


def test_fix_errors_reads_gz_and_writes_gz(examples_dir: Path, tmp_path: Path) -> None:
    plain = examples_dir / "validation_errors.jsonl"
    gz = _gzip(plain, tmp_path / "errors.jsonl.gz")
    outputs = {}
    for name, path in (("plain", plain), ("gz", gz)):
        fixed = tmp_path / f"{name}_fixed.jsonl.gz"
        assert main(["validate-data", str(path), "--fix-errors", "--output", str(fixed)]) == 1
        rejects = tmp_path / f"{name}_fixed.jsonl_rejects.jsonl"  # <output stem>_rejects.jsonl
        outputs[name] = (gzip.decompress(fixed.read_bytes()), [json.loads(r)["line"] for r in rejects.open()])
        assert main(["validate-data", str(fixed), "--quiet"]) == 0  # the fixed .gz validates cleanly
    assert outputs["plain"] == outputs["gz"]
    # 7 kept lines + line 18 repaired - line 23 (a duplicate); every other error line rejected
    assert outputs["gz"][0].count(b"\n") == 7 and len(outputs["gz"][1]) == 20


def test_tokenized_gz_equals_plain_across_workers_and_parts(
    tokenizer: ChatTokenizer, mixed: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    plain, gz = mixed
    settings = EncodeSettings.of(tokenizer)
    reference, reference_report = tokenize_source(plain, settings)
    monkeypatch.setattr(prepare_module, "IN_PROCESS_BYTES", 0)  # the spawned pool on a small file
    monkeypatch.setattr(prepare_module, "GZIP_TASK_BYTES", 20_000)  # several chunks of decompressed lines
    docs, report = tokenize_source(gz, settings, num_workers=2)
    assert len(docs.parts) > 3
    assert docs.lengths.tolist() == reference.lengths.tolist()
    assert np.array_equal(np.concatenate([p.tokens for p in docs.parts]), reference.parts[0].tokens)
    assert report.skipped_examples == reference_report.skipped_examples
    read = read_conversations(plain)  # the training reader on the plain file
    assert (report.skipped, report.conversations) == (len(read.skipped), len(read.conversations))
    assert (report.lines, report.bytes) == (read.total_lines, plain.stat().st_size)


def test_prepared_gz_shards_are_keyed_by_its_content(
    tokenizer: ChatTokenizer, examples_dir: Path, tmp_path: Path
) -> None:
    gz = _gzip(examples_dir / "conversations_eval.jsonl", tmp_path / "data.jsonl.gz")
    settings, cache = EncodeSettings.of(tokenizer), tmp_path / "prepared"
    docs, report = prepare_source(gz, settings, prepared_dir=cache)
    assert report.conversations == 50 and len(docs) == 50 and Path(report.directory).name.startswith("data-")
    assert prepare_source(gz, settings, prepared_dir=cache)[1].cached
    one_more = (examples_dir / "conversations.jsonl").read_bytes().splitlines(keepends=True)[0]
    gz.write_bytes(gzip.compress(gzip.decompress(gz.read_bytes()) + one_more))  # new content, same name
    changed, report = prepare_source(gz, settings, prepared_dir=cache)
    assert not report.cached and len(changed) == 51 and len(list(cache.glob("data-*"))) == 2
    cut = prepare_source(gz, EncodeSettings.of(tokenizer, max_line_bytes=4096), prepared_dir=cache)[1]
    assert not cut.cached  # the line limit decides which lines are tokens: part of the key too


def _stream(specs: str, strategy: str, tokenizer: ChatTokenizer, prepared: Path) -> list[torch.Tensor]:
    data = DataConfig(strategy=strategy, num_workers=0)
    sources = open_sources(parse_train_data(specs), EncodeSettings.of(tokenizer), data, prepared_dir=prepared)
    assert sources.strategy == strategy
    out = []
    for rank in range(2):
        kwargs = {"seed": 3, "rank": rank, "world_size": 2, "seq_len": 96, "pad_id": 0, "micro_batch_size": 2}
        batches = build_batches(sources, data=data, **kwargs)
        out.extend(tensor for batch in islice(iter(batches), 12) for tensor in batch)
    return out


@pytest.mark.parametrize("strategy", ["memory", "sharded", "streaming"])
def test_every_strategy_gives_the_plain_files_token_stream(
    strategy: str, tokenizer: ChatTokenizer, mixed: tuple[Path, Path], examples_dir: Path, tmp_path: Path
) -> None:
    plain, gz = mixed
    evaluation = examples_dir / "conversations_eval.jsonl"
    shutil.copy(evaluation, tmp_path / "eval.jsonl")
    eval_gz = _gzip(evaluation, tmp_path / "eval.jsonl.gz")
    # mixing: the .gz with a plain file at weight 2, against the two plain files
    expected = _stream(f"{plain},{tmp_path / 'eval.jsonl'}:2", strategy, tokenizer, tmp_path / "a")
    streamed = _stream(f"{gz},{eval_gz}:2", strategy, tokenizer, tmp_path / "b")
    assert len(streamed) == len(expected) == 2 * 12 * len(Batch._fields)
    assert all(torch.equal(a, b) for a, b in zip(streamed, expected, strict=True))
    if strategy == "streaming":  # the .gz files were prepared as shards, the plain files are read in place
        assert sorted(m.parent.name.split("-")[0] for m in (tmp_path / "b").glob("*/meta.json")) == ["eval", "mixed"]
        assert not list((tmp_path / "a").glob("*/meta.json"))


def test_tokenizer_sample_and_evaluation_read_gz(tokenizer: ChatTokenizer, examples_dir: Path, tmp_path: Path) -> None:
    plain = examples_dir / "conversations_eval.jsonl"
    gz = _gzip(plain, tmp_path / "eval.jsonl.gz")
    assert list(sample_texts([gz], max_bytes=10**6)) == list(sample_texts([plain], max_bytes=10**6))
    (rows_gz, report_gz), (rows, report) = (eval_rows(p, EncodeSettings.of(tokenizer), seq_len=64, pad_id=0)
                                            for p in (gz, plain))  # fmt: skip
    assert report_gz.conversations == report.conversations == 50
    assert np.array_equal(rows_gz.input_ids, rows.input_ids) and np.array_equal(rows_gz.labels, rows.labels)


def test_prepare_data_reads_gz_and_names_the_flags_that_reuse_its_shards(
    tokenizer: ChatTokenizer, examples_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gz = _gzip(examples_dir / "conversations_eval.jsonl", tmp_path / "eval.jsonl.gz")
    tok, cache = tmp_path / "tok.json", tmp_path / "prepared"
    tokenizer.save(tok)
    argv = ["prepare-data", str(gz), "--tokenizer", str(tok), "--output", str(cache), "--max-line-bytes", "8192"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "eval.jsonl.gz: 50 conversations" in out and "--data-strategy sharded --max-line-bytes 8192\n" in out
    # training with those flags finds the shards; with the default limit it would build new ones
    assert prepare_source(gz, EncodeSettings.of(tokenizer, max_line_bytes=8192), prepared_dir=cache)[1].cached
    assert not prepare_source(gz, EncodeSettings.of(tokenizer), prepared_dir=cache)[1].cached
