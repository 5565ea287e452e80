"""Streamed files count their tokens once (global row order needs every length) and every rank reads the counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lumina_ds.data.prepare import meter
from lumina_ds.data.prepare.documents import DocEncoder, JsonlDocs
from lumina_ds.data.prepare.lengths import count_tokens, counted_sources
from lumina_ds.data.prepare.tokenize import EncodeSettings, tokenize_source
from lumina_ds.data.records.sources import parse_train_data
from lumina_ds.errors import DataError
from lumina_ds.tokenizer import ChatTokenizer


def test_counts_equal_the_tokenized_lengths_with_workers(tokenizer: ChatTokenizer, examples_dir: Path) -> None:
    path = examples_dir / "bad_lines.jsonl"
    tokenized, expected = tokenize_source(path, EncodeSettings.of(tokenizer))
    source = JsonlDocs(path, DocEncoder(tokenizer))
    report = count_tokens(source, num_workers=2)
    assert source.lengths is not None and np.array_equal(source.lengths, tokenized.lengths)
    assert (report.lines, report.conversations, report.tokens, report.skipped) == (
        expected.lines, expected.conversations, expected.tokens, expected.skipped)  # fmt: skip
    assert [s.line_no for s in report.skipped_examples] == [s.line_no for s in expected.skipped_examples]
    with pytest.raises(DataError) as err:
        count_tokens(JsonlDocs(path, DocEncoder(tokenizer)), strict=True)
    assert err.value.code == expected.skipped_examples[0].code and f"line {expected.skipped_examples[0].line_no}" in (
        err.value.message
    )


def test_counts_are_cached_and_a_second_run_reads_them(
    tokenizer: ChatTokenizer, examples_dir: Path, tmp_path: Path
) -> None:
    specs = parse_train_data(str(examples_dir / "conversations_eval.jsonl"))
    settings = EncodeSettings.of(tokenizer)
    first = [JsonlDocs(specs[0].source.local, DocEncoder(tokenizer))]
    (built,) = counted_sources(specs, first, settings, prepared_dir=tmp_path)
    again = [JsonlDocs(specs[0].source.local, DocEncoder(tokenizer))]
    meter.take()
    (read,) = counted_sources(specs, again, settings, prepared_dir=tmp_path)
    assert meter.take().tokens_encoded == 0  # nothing tokenized the second time
    assert not built.cached and read.cached and read.tokens == built.tokens
    assert np.array_equal(again[0].lengths, first[0].lengths)  # type: ignore[arg-type]
    assert "token counts reused" in read.summary()
