"""Training on a Parquet file and a `datasets` save_to_disk directory, mixed with weights: the same losses as the
same conversations in JSONL, and a run resumed from its checkpoint continues exactly (losses, tokens, data
positions) as the uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import read_conversations
from tests.runs import EVAL, FAST, TRAIN, here, read_metrics


def _write_sources(directory: Path) -> tuple[str, str]:
    """(`--train-data` of the tables, the same data as messages JSONL): the bundled training chats as ShareGPT
    Parquet, the eval chats as an Alpaca save_to_disk directory (single-turn ones only, with their system)."""
    import datasets

    names = {"user": "human", "assistant": "gpt", "system": "system"}
    chats = read_conversations(TRAIN).conversations
    sharegpt = [{"conversations": [{"from": names[m.role], "value": m.content} for m in c]} for c in chats]
    pq.write_table(pa.Table.from_pylist(sharegpt), directory / "chats.parquet", row_group_size=64)
    single = [c for c in read_conversations(EVAL).conversations if [m.role for m in c][-2:] == ["user", "assistant"]
              and len([m for m in c if m.role != "system"]) == 2]  # fmt: skip
    alpaca = [{"instruction": c[-2].content, "output": c[-1].content,
               "system": c[0].content if c[0].role == "system" else None} for c in single]  # fmt: skip
    datasets.Dataset.from_list(alpaca).save_to_disk(str(directory / "alpaca"))
    with (directory / "chats.jsonl").open("w") as out:
        out.writelines(json.dumps({"messages": [m.__dict__ for m in c]}) + "\n" for c in chats)
    with (directory / "alpaca.jsonl").open("w") as out:
        out.writelines(json.dumps({"messages": [m.__dict__ for m in c]}) + "\n" for c in single)
    assert len(single) >= 10
    return "chats.parquet:0.5,alpaca:2", "chats.jsonl:0.5,alpaca.jsonl:2"


def _train(workdir: Path, name: str, data: str, strategy: str, *extra: str) -> Path:
    args = [*FAST, "--train-data", data, "--max-steps", "8", "--experiment-name", name, "--output-dir", "runs"]
    args += ["--tokenizer", "tok.json", "--data-strategy", strategy, "--eval-every-n-steps", "100"]
    proc = here(["train", *args, *extra], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"data strategy: {strategy}" in proc.stdout
    return workdir / "runs" / name


def _data_position(run: Path, step: int) -> dict:
    state = run / "checkpoints" / f"step_{step:08d}" / "lumina_state" / "rank00000.json"
    return dict(json.loads(state.read_text())["data"])


def test_tables_mixed_with_weights_train_like_jsonl_and_resume_exactly(workdir: Path) -> None:
    tables, jsonl = _write_sources(workdir)
    proc = here(["tokenizer", "train", "chats.jsonl", "--vocab-size", "512", "--output", "tok.json"], cwd=workdir)
    assert proc.returncode == 0
    full = _train(workdir, "full", tables, "memory", "--save-every-n-steps", "4")
    reference, _ = read_metrics(full)
    assert [r["step"] for r in reference] == list(range(1, 9))
    as_jsonl, _ = read_metrics(_train(workdir, "jsonl", jsonl, "memory"))
    assert [r["loss"] for r in as_jsonl] == pytest.approx([r["loss"] for r in reference], abs=1e-6)
    assert [r["tokens"] for r in as_jsonl] == [r["tokens"] for r in reference]
    resumed = _train(workdir, "resumed", tables, "streaming", "--num-workers", "2", "--save-every-n-steps", "4",
                     "--resume", str(full / "checkpoints" / "step_00000004"))  # fmt: skip
    logs, _ = read_metrics(resumed)
    assert [r["step"] for r in logs] == [5, 6, 7, 8]
    assert [r["loss"] for r in logs] == pytest.approx([r["loss"] for r in reference[4:]], abs=1e-6)
    assert [r["tokens"] for r in logs] == [r["tokens"] for r in reference[4:]]
    assert _data_position(resumed, 8) == _data_position(full, 8)
    assert _data_position(full, 8) != _data_position(full, 4)
