"""ZeRO++ hierarchical partitioning, the planner's option at ZeRO-3 with EP 1 across nodes: four CPU ranks as two
"nodes" of two (`zero_hpz_partition_size` 2) train exactly like plain ZeRO-3, and the generated DeepSpeed JSON
carries the key. hpZ changes where backward gathers the parameters from, not the math."""

from __future__ import annotations

import json
from pathlib import Path

from tests.runs import FAST, TRAIN, losses, ranks


def train_four_ranks(root: Path, name: str, tokenizer: Path, extra: list[str]) -> Path:
    argv = ["train", *FAST, "--train-data", TRAIN, "--tokenizer", str(tokenizer), "--precision", "fp32",
            "--zero-stage", "3", "--max-steps", "6", "--micro-batch-size", "2", "--no-progress-bar",
            "--experiment-name", name, *extra]  # fmt: skip
    done = ranks(argv, cwd=root, n=4)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return root / "runs" / name


def test_hpz_over_two_nodes_of_two_trains_like_plain_zero3(tmp_path: Path, shared_run: Path) -> None:
    tokenizer = shared_run / "tokenizer.json"
    config = tmp_path / "hpz.json"
    config.write_text(json.dumps({"zero_optimization": {"zero_hpz_partition_size": 2}}))
    hpz = train_four_ranks(tmp_path, "hpz", tokenizer, ["--deepspeed-config", str(config)])
    plain = train_four_ranks(tmp_path, "plain", tokenizer, [])
    assert json.loads((hpz / "ds_config.json").read_text())["zero_optimization"]["zero_hpz_partition_size"] == 2
    assert "zero_hpz_partition_size" not in json.loads((plain / "ds_config.json").read_text())["zero_optimization"]
    got, expected = losses(hpz), losses(plain)
    assert sorted(got) == list(range(1, 7))
    assert all(abs(got[s] - expected[s]) <= 1e-5 for s in got), (got, expected)
