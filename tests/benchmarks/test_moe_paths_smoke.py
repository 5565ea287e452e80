"""benchmarks/moe_paths.py runs both experts paths on a tiny model (on a CPU: times only, no sync counts)."""

from __future__ import annotations

import sys

import pytest

from tests.benchmarks.conftest import load_benchmark


def test_both_paths_run_and_report(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_benchmark("moe_paths")
    argv = ["moe_paths.py", "--hidden", "32", "--layers", "1", "--experts", "4", "--expert-ffn", "16", "--vocab",
            "64", "--batch-size", "2", "--seq-len", "16", "--steps", "2"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(bench.moe, "EXPERTS_PATH", "auto")  # restored after: the benchmark sets it per path
    bench.main()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["grouped", "loop"]
    assert all("tokens/s" in line and "n/a (CPU)" in line for line in lines[1:])
