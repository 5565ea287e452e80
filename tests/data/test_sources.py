"""Data sources and record formats: every kind of source and every format reads as the same conversations (the
expectations are written by hand), forced formats and renamed fields, bad records by row number, E112-E114."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lumina_ds.config.run import DataConfig
from lumina_ds.data import sample_texts
from lumina_ds.data.prepare.tokenize import EncodeSettings, prepare_source, tokenize_source
from lumina_ds.data.records.checks import LineLimit
from lumina_ds.data.records.formats import RecordFormat, parse_fields
from lumina_ds.data.records.sources import check_input_files, open_source, parse_source, parse_train_data
from lumina_ds.data.validate.validator import summary_lines, validate_files
from lumina_ds.errors import ConfigError, DataError
from lumina_ds.tokenizer import ChatTokenizer
from lumina_ds.tokenizer.chat_format import Message
from tests.helpers import read_conversations

ROOT = Path(__file__).resolve().parents[2]

# The three conversations every source below holds, written out by hand.
EXPECTED = [
    [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello!")],
    [
        Message("user", "Add 2 and 3"),
        Message("assistant", "5"),
        Message("user", "Times 4?"),
        Message("assistant", "20"),
    ],
    [Message("user", "Translate to French\ncat"), Message("assistant", "chat")],
]
MESSAGES = [{"messages": [{"role": m.role, "content": m.content} for m in conversation]} for conversation in EXPECTED]
SHAREGPT = [
    {"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    {
        "conversations": [
            {"from": "human", "value": "Add 2 and 3"},
            {"from": "gpt", "value": "5"},
            {"from": "human", "value": "Times 4?"},
            {"from": "gpt", "value": "20"},
        ]
    },
    {"conversations": [{"from": "human", "value": "Translate to French\ncat"}, {"from": "gpt", "value": "chat"}]},
]
ALPACA = [
    {"instruction": "Hi", "input": "", "output": "Hello!", "system": "Be brief.", "history": []},
    {"instruction": "Times 4?", "input": "", "output": "20", "system": None, "history": [["Add 2 and 3", "5"]]},
    {"instruction": "Translate to French", "input": "cat", "output": "chat", "system": None, "history": []},
]
PROMPT_COMPLETION = [  # text pairs, and a conversational one (lists of messages, as TRL writes them)
    {"system": "Be brief.", "prompt": "Hi", "completion": "Hello!"},
    {
        "prompt": [
            {"role": "user", "content": "Add 2 and 3"},
            {"role": "assistant", "content": "5"},
            {"role": "user", "content": "Times 4?"},
        ],
        "completion": [{"role": "assistant", "content": "20"}],
    },
    {"prompt": "Translate to French\ncat", "completion": "chat"},
]


def write_jsonl(path: Path, records: list[Any]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as handle:  # type: ignore[operator]
        handle.writelines(json.dumps(r) + "\n" for r in records)
    return path


def write_json(path: Path, records: list[Any]) -> Path:
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def write_parquet(path: Path, records: list[dict[str, Any]], *, row_group_size: int = 2) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path


def save_to_disk(path: Path, records: list[dict[str, Any]]) -> Path:
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    """Each format in a different kind of source."""
    return {
        "messages": write_jsonl(tmp_path / "messages.jsonl", MESSAGES),
        "sharegpt": write_jsonl(tmp_path / "sharegpt.jsonl.gz", SHAREGPT),
        "alpaca": write_parquet(tmp_path / "alpaca.parquet", ALPACA),
        "prompt-completion": write_json(tmp_path / "pc.json", PROMPT_COMPLETION),
        "arrow": save_to_disk(tmp_path / "saved", SHAREGPT),
        "messages-parquet": write_parquet(tmp_path / "messages.parquet", MESSAGES),
        "json-lines": write_jsonl(tmp_path / "lines.json", ALPACA),  # a .json of JSON lines is JSONL
    }


def test_every_format_and_kind_of_source_reads_as_the_same_conversations(sources: dict[str, Path]) -> None:
    for name, path in sources.items():
        result = read_conversations(path)
        assert result.skipped == [], name
        assert result.conversations == EXPECTED, name
    kinds = {name: (parse_source(p).kind, open_source(p, RecordFormat()).record_format.name) for name, p in
             sources.items()}  # fmt: skip
    assert kinds == {
        "messages": ("jsonl", "messages"),
        "sharegpt": ("jsonl", "sharegpt"),
        "alpaca": ("parquet", "alpaca"),
        "prompt-completion": ("json", "prompt-completion"),
        "arrow": ("arrow", "sharegpt"),
        "messages-parquet": ("parquet", "messages"),
        "json-lines": ("jsonl", "alpaca"),
    }


def test_every_source_tokenizes_to_the_tokens_of_the_messages_jsonl(
    sources: dict[str, Path], tokenizer: ChatTokenizer, tmp_path: Path
) -> None:
    settings = EncodeSettings.of(tokenizer)
    reference, _ = tokenize_source(sources["messages"], settings)
    want = [reference.doc(i) for i in range(len(reference))]
    assert all(d is not None and len(d[0]) > 10 for d in want)
    for name, path in sources.items():
        docs, report = tokenize_source(path, settings)
        got = [docs.doc(i) for i in range(len(docs))]
        assert report.conversations == 3 and report.skipped == 0, name
        for (ids, target), (ref_ids, ref_target) in zip(got, want, strict=True):  # type: ignore[misc]
            assert np.array_equal(ids, ref_ids) and np.array_equal(target, ref_target), name


def test_forced_format_and_renamed_fields(tmp_path: Path) -> None:
    renamed = [{"question": r["instruction"], "context": r["input"], "answer": r["output"], "sys": r["system"],
                "turns": r["history"]} for r in ALPACA]  # fmt: skip
    path = write_parquet(tmp_path / "renamed.parquet", renamed)
    with pytest.raises(DataError) as no_format:
        read_conversations(path)
    assert no_format.value.code == "E112" and "question, context, answer, sys, turns" in str(no_format.value)
    fields = parse_fields("instruction=question,input=context,output=answer,system=sys,history=turns")
    for name in ("auto", "alpaca"):
        limit = LineLimit(record_format=RecordFormat(name, fields))
        assert read_conversations(path, limit=limit).conversations == EXPECTED
    with pytest.raises(DataError, match="no column prompt, completion for --data-format prompt-completion"):
        read_conversations(path, limit=LineLimit(record_format=RecordFormat("prompt-completion", fields)))
    with pytest.raises(ConfigError, match="an unknown field"):
        parse_fields("question=instruction")
    # renamed turns: their list, and the role and content keys inside them
    dialogs = [{"dialog": [{"speaker": t["role"], "text": t["content"]} for t in r["messages"]]} for r in MESSAGES]
    renamed_turns = write_jsonl(tmp_path / "dialogs.jsonl", dialogs)
    fmt = RecordFormat("auto", parse_fields("messages=dialog,role=speaker,content=text"))
    assert read_conversations(renamed_turns, limit=LineLimit(record_format=fmt)).conversations == EXPECTED
    assert [s.code for s in read_conversations(renamed_turns).skipped] == ["E102"] * 3
    # a JSONL file's format is decided once: a record of another format is E112 with its line number
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [SHAREGPT[0], MESSAGES[1], SHAREGPT[2]])
    result = read_conversations(mixed)
    assert result.conversations == [EXPECTED[0], EXPECTED[2]]
    assert [(s.line_no, s.code) for s in result.skipped] == [(2, "E112")]
    assert "ShareGPT detected from line 1" in result.skipped[0].reason
    forced = read_conversations(mixed, limit=LineLimit(record_format=RecordFormat("messages")))
    assert [(s.line_no, s.code) for s in forced.skipped] == [(1, "E112"), (3, "E112")]


def test_the_tokenizer_sample_and_prepared_shards_follow_the_record_format(
    tokenizer: ChatTokenizer, tmp_path: Path
) -> None:
    renamed = [{"question": r["instruction"], "context": r["input"], "answer": r["output"], "sys": r["system"],
                "turns": r["history"]} for r in ALPACA]  # fmt: skip
    path = write_parquet(tmp_path / "renamed.parquet", renamed)
    fields = parse_fields("instruction=question,input=context,output=answer,system=sys,history=turns")
    limit = LineLimit(record_format=RecordFormat("auto", fields))
    texts = list(sample_texts([str(path)], max_bytes=1 << 20, limit=limit))
    assert texts == [m.content for conversation in EXPECTED for m in conversation]
    cache = tmp_path / "prepared"
    settings = EncodeSettings.of(tokenizer, record_format=limit.record_format)
    docs, first = prepare_source(path, settings, prepared_dir=cache)
    assert (first.cached, first.conversations, Path(first.directory).parent) == (False, 3, cache)
    assert prepare_source(path, settings, prepared_dir=cache)[1].cached
    forced = EncodeSettings.of(tokenizer, record_format=RecordFormat("alpaca", fields))
    again = prepare_source(path, forced, prepared_dir=cache)[1]  # another record format: another key
    assert not again.cached and again.directory != first.directory
    reference, _ = tokenize_source(write_jsonl(tmp_path / "m.jsonl", MESSAGES), EncodeSettings.of(tokenizer))
    assert [docs.doc(i)[0].tolist() for i in range(3)] == [reference.doc(i)[0].tolist() for i in range(3)]


def test_bad_records_are_reported_by_row_number_in_parquet_and_arrow(tmp_path: Path) -> None:
    rows = [*MESSAGES, MESSAGES[0], MESSAGES[1]]  # 5 rows; row 3 gets an unknown role, row 5 no assistant content
    rows[2] = {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "boop"}]}
    rows[4] = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}
    table = write_parquet(tmp_path / "five.parquet", rows)  # row groups of 2: row 3 opens the second group
    saved = save_to_disk(tmp_path / "five", rows)
    for path in (table, saved):
        validator = validate_files([path])
        issues = [(i["row"], i["code"], i["kind"]) for i in validator.issues if i["severity"] == "error"]
        assert issues == [(3, "E101", "unknown_role"), (5, "E102", "no_assistant_content")], path
        assert validator.lines == 5 and validator.valid == 3
        summary = "\n".join(summary_lines(validator))
        assert "5 rows (0 blank), 3 conversations training uses, 2 rows with errors" in summary
        assert "unknown role; row 3" in summary
        skipped = read_conversations(path).skipped
        assert [(s.line_no, s.code) for s in skipped] == [(3, "E101"), (5, "E102")]
        with pytest.raises(DataError, match=r"row 3: .*robot"):
            read_conversations(path, strict=True)
    fixed, rejects = tmp_path / "fixed.jsonl", tmp_path / "rejects.jsonl"
    validate_files([table], fix_output=fixed, rejects_output=rejects)
    kept = [json.loads(line) for line in fixed.read_text().splitlines()]
    assert kept == MESSAGES[:2]  # rows 1 and 2 as messages JSONL; row 4 repeats row 1 and is dropped
    rejected = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["row"], r["code"]) for r in rejected] == [(3, "E101"), (5, "E102")]
    assert json.loads(rejected[0]["raw"]) == rows[2]


def test_tool_turns_are_refused_with_e114(tmp_path: Path) -> None:
    turns = [("human", "Weather?"), ("function_call", "{}"), ("observation", "sunny"), ("gpt", "Sunny.")]
    tool = {"conversations": [{"from": who, "value": text} for who, text in turns]}
    path = write_jsonl(tmp_path / "tools.jsonl", [SHAREGPT[0], tool, SHAREGPT[2]])
    result = read_conversations(path)
    assert result.conversations == [EXPECTED[0], EXPECTED[2]]
    assert [(s.line_no, s.code, s.kind) for s in result.skipped] == [(2, "E114", "tool_role")]
    assert "conversations[1] is a 'function_call' turn" in result.skipped[0].reason


def test_a_table_no_format_fits_is_e112_before_any_work(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "other.parquet", [{"text": "plain text"}])
    with pytest.raises(DataError) as caught:
        check_input_files(DataConfig(train_data=str(path)))
    assert caught.value.code == "E112" and "columns: text" in str(caught.value)
    fake = tmp_path / "fake.parquet"
    fake.write_text('{"messages": []}\n')
    with pytest.raises(DataError, match="not Parquet") as caught:
        parse_source(fake)
    assert caught.value.code == "E110"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="not a datasets save_to_disk directory"):
        parse_source(empty)


def test_train_data_spec_mixes_kinds_with_weights(sources: dict[str, Path]) -> None:
    spec = f"{sources['alpaca']}:0.3,{sources['arrow']},hf://org/chats:en@train:2"
    specs = parse_train_data(spec)
    assert [(s.source.kind, s.weight) for s in specs] == [("parquet", 0.3), ("arrow", 1.0), ("hub", 2.0)]
    hub = specs[2].source
    assert (hub.dataset, hub.config, hub.split, hub.stem) == ("org/chats", "en", "train", "org--chats-en-train")
    saved = parse_source(f"{sources['arrow']}@train")
    assert (saved.kind, saved.split) == ("arrow", "train")
    with pytest.raises(ConfigError):
        parse_source("hf://org/chats:@train")


def test_a_dataset_dict_split_is_chosen_by_name(tmp_path: Path) -> None:
    import datasets

    both = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(MESSAGES), "test": datasets.Dataset.from_list(MESSAGES[:1])}
    )
    both.save_to_disk(str(tmp_path / "dict"))
    assert read_conversations(tmp_path / "dict").conversations == EXPECTED  # "train" when none is named
    assert read_conversations(f"{tmp_path / 'dict'}@test").conversations == EXPECTED[:1]
    with pytest.raises(DataError, match="no split 'dev': train, test") as caught:
        read_conversations(f"{tmp_path / 'dict'}@dev")
    assert caught.value.code == "E113"


def test_an_uncached_hub_dataset_offline_is_e113_naming_the_cache(tmp_path: Path) -> None:
    """In a child process: datasets reads HF_HUB_OFFLINE and HF_HOME when it is imported."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lumina_ds", "validate-data", "hf://lumina-ds-tests/no-such-chats@train"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "E113" in proc.stderr and "not in the local Hugging Face cache" in proc.stderr
    assert str(tmp_path / "hf") in proc.stderr  # the cache path it looked in


def test_a_hub_name_is_loaded_through_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    """hf://NAME:CONFIG@SPLIT -> datasets.load_dataset(NAME, CONFIG, split=SPLIT), read like any Arrow table."""
    import datasets

    from lumina_ds.data.records import tables

    calls = []

    def load_dataset(name: str, config: str | None, *, split: str | None) -> datasets.Dataset:
        calls.append((name, config, split))
        return datasets.Dataset.from_list(ALPACA)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    tables.load_hub.cache_clear()
    try:
        assert read_conversations("hf://org/chats:en@train").conversations == EXPECTED
    finally:
        tables.load_hub.cache_clear()
    assert calls == [("org/chats", "en", "train")]


# ---- every strategy reads tables, mixed with weights, and resumes exactly ----------------------------------------


def _chat_tables(tmp_path: Path) -> str:
    """The bundled eval conversations as a ShareGPT Parquet file (row groups of 7) and a prompt/completion
    save_to_disk directory (each conversation's last assistant turn as the completion): `--train-data` for both."""
    conversations = read_conversations(ROOT / "examples" / "conversations_eval.jsonl").conversations
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    sharegpt = [{"conversations": [{"from": names[m.role], "value": m.content} for m in c]} for c in conversations]
    pairs = [{"prompt": [{"role": m.role, "content": m.content} for m in c[:-1]],
              "completion": [{"role": "assistant", "content": c[-1].content}]} for c in conversations]  # fmt: skip
    table = write_parquet(tmp_path / "chats.parquet", sharegpt, row_group_size=7)
    saved = save_to_disk(tmp_path / "pairs", pairs)
    return f"{table}:0.5,{saved}:2"


def test_every_strategy_reads_tables_into_the_same_batches_and_resumes(
    tokenizer: ChatTokenizer, tmp_path: Path
) -> None:
    from lumina_ds.data.loading.pipeline import build_batches, open_sources
    from lumina_ds.data.prepare.documents import TableDocs

    spec = _chat_tables(tmp_path)
    encode = EncodeSettings.of(tokenizer)

    def batches(strategy: str) -> Any:
        data = DataConfig(train_data=spec, strategy=strategy, num_workers=2 if strategy == "streaming" else 1)
        opened = open_sources(parse_train_data(spec), encode, data, prepared_dir=tmp_path / "prepared")
        assert opened.strategy == strategy
        assert strategy != "streaming" or all(isinstance(s, TableDocs) for s in opened.sources)
        assert [r.conversations for r in opened.reports] == [50, 50]
        return build_batches(opened, seed=3, rank=0, world_size=1, seq_len=96, pad_id=0, micro_batch_size=2,
                             data=data)  # fmt: skip

    def take(source: Any, n: int) -> list[Any]:
        out = []
        for batch in source:
            out.append([t.clone() for t in batch])
            if len(out) == n:
                return out
        return out

    reference = take(batches("memory"), 40)  # past the end of epoch 0
    for strategy in ("sharded", "streaming"):
        assert _same(take(batches(strategy), 40), reference), strategy
        first = batches(strategy)
        seen = take(first, 13)
        resumed = batches(strategy)
        resumed.load_state_dict(first.state_dict())
        assert _same(seen + take(resumed, 27), reference), strategy


def _same(a: list[Any], b: list[Any]) -> bool:
    import torch

    return len(a) == len(b) and all(
        torch.equal(u, v) for x, y in zip(a, b, strict=True) for u, v in zip(x, y, strict=True)
    )


def test_evaluation_data_may_be_a_table(sources: dict[str, Path], tokenizer: ChatTokenizer) -> None:
    from lumina_ds.data.loading.pipeline import eval_rows

    encode = EncodeSettings.of(tokenizer)
    reference, _ = eval_rows(str(sources["messages"]), encode, seq_len=64, pad_id=0)
    for name in ("alpaca", "arrow"):
        rows, report = eval_rows(str(sources[name]), encode, seq_len=64, pad_id=0)
        assert report.conversations == rows.num_conversations == 3
        assert np.array_equal(rows.input_ids, reference.input_ids) and np.array_equal(rows.labels, reference.labels)
