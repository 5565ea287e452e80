"""Weights & Biases: a real one-rank run with --wandb under WANDB_MODE=offline writes a W&B run whose history holds
the log records' scalars and whose config is the resolved run config; without the package, E003 before any work."""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lumina_ds.config.presets import get_preset
from lumina_ds.errors import ConfigError
from tests.runs import FAST, TRAIN, here, read_metrics

BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of records with a 7-byte header each


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of a .wandb file (wandb 0.31 ships no Python reader of its own)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pieces = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        piece, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pieces = piece if kind in (1, 2) else pieces + piece  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record


def test_offline_run_holds_the_scalars_and_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    proc = here(["train", "--train-data", TRAIN, *FAST, "--max-steps", "2", "--seq-len", "64", "--moe-backend",
                 "native", "--wandb", "--wandb-project", "p", "--wandb-run-name", "offline-test", "--output-dir",
                 str(tmp_path / "runs")], cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    logs, _ = read_metrics(tmp_path / "runs" / "run")
    (wandb_file,) = (tmp_path / "wb").glob("wandb/offline-run-*/run-*.wandb")
    history, runs = [], []
    for record in wandb_records(wandb_file):
        if record.WhichOneof("record_type") == "history":
            items = record.history.item  # W&B's own keys (_step, ...) come as nested keys
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
        elif record.WhichOneof("record_type") == "run":
            runs.append(record.run)
    assert [row["_step"] for row in history] == [1, 2]
    for row, log in zip(history, logs, strict=True):
        assert row["train/loss"] == pytest.approx(log["loss"])
        assert row["train/tflops"] == pytest.approx(log["tflops"])
        assert row["router/drop_rate/moe_layer_1"] == pytest.approx(log["drop_rate"][1])
        assert row["router/router_entropy/moe_layer_0"] == pytest.approx(log["router_entropy"][0])
        assert "train/mfu" not in row  # null on a CPU: not plotted
    assert runs[0].display_name == "offline-test" and runs[0].project == "p"
    config = {item.key: json.loads(item.value_json) for item in runs[0].config.update}
    assert config["train"]["max_steps"] == 2 and config["distributed"]["moe_backend"] == "native"
    assert config["model"]["moe"]["num_experts"] == 4 and config["logging"]["wandb_project"] == "p"


def test_missing_wandb_is_e003_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lumina_ds.training import session

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    monkeypatch.setattr(session, "init_distributed", lambda **_: pytest.fail("work started before the check"))
    run_config = get_preset("debug")
    run_config.data.train_data = TRAIN
    run_config.logging.output_dir = str(tmp_path)
    run_config.logging.wandb = True
    with pytest.raises(ConfigError) as caught:
        session.train(run_config)
    assert caught.value.code == "E003" and "pip install lumina-ds[wandb]" in caught.value.hint
    assert not (tmp_path / "run").exists()
