"""benchmarks/fault_drill.py with one kill during a save of a 6-step 2-rank run (30-50 s on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmarks.conftest import load_benchmark


@pytest.mark.slow
def test_one_kill_during_a_save_is_survived_exactly_with_no_data_lost(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    drill = load_benchmark("fault_drill")
    summary = drill.main(["--kills", "1", "--steps", "6", "--seed", "5", "--workdir", str(tmp_path)])
    assert [kill["kind"] for kill in summary["per_kill"]] == ["in-save"]  # seed 5 draws a kill during a save
    assert summary["survived"] == 1 and summary["final_exit"] == 0
    assert summary["resumes_exact"] == 1 and summary["max_loss_gap"] <= 1e-5
    data = summary["data"]
    assert data["steps_logged"] == data["steps"] == 6 and data["token_gap"] == 0
    assert data["tags"] == 3 and data["positions"] == 6 and data["position_gap"] == 0  # tags 2, 4, 6 on 2 ranks
    out = capsys.readouterr().out
    assert "kills survived: 1/1" in out and "resumes exact: 1/1" in out and "data lost: 0 " in out
