from __future__ import annotations

from pathlib import Path

import pytest

from lumina_ds.config.run import DataConfig
from lumina_ds.data.loading.pipeline import (
    build_batches,
    choose_strategy,
    eval_rows,
    micro_batches_for_epochs,
    mixture_of,
    open_sources,
)
from lumina_ds.data.prepare.tokenize import EncodeSettings
from lumina_ds.data.records.sources import parse_train_data
from lumina_ds.errors import ConfigError, DataError
from lumina_ds.tokenizer import ChatTokenizer

GB = 10**9
RAM = 16 * 2**30


@pytest.mark.parametrize(
    ("size", "ram", "requested", "expected"),
    [
        (100 * 10**6, RAM, "auto", "memory"),
        (100 * 10**6, 400 * 2**20, "auto", "sharded"),  # 300 MB to tokenize in RAM > half of 400 MiB free
        (2 * GB, RAM, "auto", "sharded"),
        (20 * GB, RAM, "auto", "streaming"),
        (20 * GB, RAM, "memory", "memory"),
    ],
)
def test_strategy_by_size_and_free_memory(size: int, ram: int, requested: str, expected: str) -> None:
    assert choose_strategy(size, requested=requested, available_ram=ram)[0] == expected


def test_unknown_strategy_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        choose_strategy(1, requested="tape", available_ram=RAM)


@pytest.mark.parametrize("strategy", ["memory", "streaming"])
def test_steps_per_epoch_match_what_each_rank_yields(
    tokenizer: ChatTokenizer, examples_dir: Path, tmp_path: Path, strategy: str
) -> None:
    """Exact for streaming too: a streamed file's tokens are counted once before training (and cached)."""
    specs = parse_train_data(f"{examples_dir / 'conversations.jsonl'},{examples_dir / 'bad_lines.jsonl'}:3")
    data = DataConfig(strategy=strategy, num_workers=0)
    sources = open_sources(specs, EncodeSettings.of(tokenizer), data, prepared_dir=tmp_path)
    mixture = mixture_of(sources, seed=5)
    micro = micro_batches_for_epochs(sources, mixture, epochs=2, world_size=2, seq_len=128, micro_batch_size=3)
    yielded = []
    for rank in range(2):
        kwargs = {"rank": rank, "world_size": 2, "seq_len": 128, "pad_id": 0, "micro_batch_size": 3}
        batches = build_batches(sources, seed=5, data=data, **kwargs)
        complete = 0  # micro-batches taken while every rank's rows so far lie in epochs 0 and 1
        for _ in batches:
            if batches.epoch >= 2 and batches.position != (2, 0):
                break
            complete += 1
        yielded.append(complete)
    assert micro == yielded[0] == yielded[1]
    total_rows = batches.rows.rows_in_epoch(0) + batches.rows.rows_in_epoch(1)
    assert micro == total_rows // (2 * 3)
    if strategy == "streaming":
        again = open_sources(specs, EncodeSettings.of(tokenizer), data, prepared_dir=tmp_path)
        assert all(report.cached for report in again.reports)  # counted once, read back


def test_eval_rows_are_the_file_in_order(tokenizer: ChatTokenizer, examples_dir: Path) -> None:
    rows, report = eval_rows(
        examples_dir / "conversations_eval.jsonl", EncodeSettings.of(tokenizer), seq_len=64, pad_id=0
    )
    assert report.conversations == rows.num_conversations == 50
    assert rows.input_ids.shape[1] == 64 and rows.input_ids[0, 0] == tokenizer.bos_id
    assert (rows.labels != -100).sum() > 0


def test_eval_file_without_a_usable_conversation_is_e106(tokenizer: ChatTokenizer, tmp_path: Path) -> None:
    path = tmp_path / "eval.jsonl"
    path.write_text('{"messages": []}\n[1, 2]\n{"messages": [{"role": "user", "content": "no answer"}]}\n')
    with pytest.raises(DataError) as err:
        eval_rows(path, EncodeSettings.of(tokenizer), seq_len=64, pad_id=0)
    assert err.value.code == "E106" and "0 of" not in err.value.message and "3 of 3 lines skipped" in err.value.message
