"""benchmarks/memory_check.py as a user runs it, on the case the memory model used to miss most: the 57M MoE on two
ranks at ZeRO-3, whose parameters stay gathered from forward into backward (the reuse window; the model counted one
module and came out 11-16% low). Model states and peak memory within 10% of what the ranks measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks.conftest import BENCHMARKS
from tests.runs import child_env

TOLERANCE = 0.10


@pytest.mark.slow
def test_zero3_on_two_ranks_is_predicted_within_10_percent(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "memory_check.py"), "--case", "11", "--json", str(out)],
                          env=child_env(2), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    [row] = json.loads(out.read_text())
    assert (row["model"], row["ranks"], row["zero"], row["ckpt"]) == ("m57", 2, 3, False)
    for key in ("states", "overall"):
        error = (row["predicted"][key] - row["measured"][key]) / row["measured"][key]
        assert abs(error) <= TOLERANCE, (key, row)
    assert row["measured"]["process"] > 0 and row["measured"]["rank_load"] == 1.0  # EP 1: every expert is local
