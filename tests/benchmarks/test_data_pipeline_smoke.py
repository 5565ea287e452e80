"""The data pipeline benchmark runs end to end on a tiny corpus (no wall-clock assertions: benchmarks are not tests)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.benchmarks.conftest import load_benchmark


def test_data_pipeline_benchmark_reports_every_measurement(tmp_path: Path) -> None:
    module = load_benchmark("data_pipeline")
    out = tmp_path / "result.json"
    args = ["--size-mb", "0.3", "--vocab-size", "512", "--workers", "1", "--batches", "4", "--train-steps", "1"]
    result = module.main([*args, "--output", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    names = [row["measurement"] for row in result["rows"]]
    assert names == [
        "tokenize into RAM, 1 process(es)",
        "prepare-data (write shards), 1 process(es)",
        "streaming: count tokens once, 1 worker(s)",
        "read batches: memory",
        "read batches: sharded",
        "read batches: streaming, 0 worker(s)",
        "read batches: streaming, 1 worker(s)",
    ]
    assert all(row["tokens_per_s"] > 0 for row in result["rows"]) and result["debug_train_tokens_per_s"] > 0
    assert 0.3 <= result["corpus_mb"] <= 0.4  # the generator stops within one pass over the examples of the target
