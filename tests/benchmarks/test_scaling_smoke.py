"""benchmarks/scaling.py trains the same run as one process and as 2 ranks (DeepSpeed launcher, gloo) and compares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.conftest import load_benchmark


@pytest.mark.slow
def test_one_process_and_two_ranks_train_the_same_global_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = load_benchmark("scaling")
    out = tmp_path / "scaling.jsonl"
    bench.main(["--steps", "4", "--log-every", "1", "--seq-len", "64", "--micro-batch-size", "2",
                "--output", str(out)])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("one process (2 threads): ")
    assert lines[1].startswith("2 ranks (1 thread each, EP 2, ZeRO 2): ")
    assert lines[2].startswith("ratio 2 ranks / one process tokens/s: ") and lines[2].endswith("x")
    result = json.loads(out.read_text())
    assert result["global_batch"] == 4 and len(result["one_process_tokens_per_s"]) == 1
    one, two = result["one_process_tokens_per_s"][0], result["ranks_tokens_per_s"][0]
    assert one > 0 and two > 0 and result["ratio"] == pytest.approx(two / one)


def test_median_skips_the_warm_up_record_and_needs_two(tmp_path: Path) -> None:
    bench = load_benchmark("scaling")
    metrics = tmp_path / "metrics.jsonl"
    records = [{"loss": 1.0, "tokens_per_s": 10.0}, {"eval_loss": 2.0}, {"loss": 1.0, "tokens_per_s": 300.0},
               {"loss": 1.0, "tokens_per_s": 100.0}, {"loss": 1.0, "tokens_per_s": 200.0}]  # fmt: skip
    metrics.write_text("\n".join(json.dumps(r) for r in records))
    assert bench.median_tokens_per_s(metrics) == 200.0  # 300, 100, 200 after the first
    metrics.write_text(json.dumps(records[0]))
    with pytest.raises(SystemExit, match="fewer than 2"):
        bench.median_tokens_per_s(metrics)
