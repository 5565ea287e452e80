"""benchmarks/cluster_drill.py in small: a host killed mid-run and a host killed during a save, on two namespace
hosts of two ranks under torchrun; each relaunch resumes from the newest complete tag with the losses and data
positions of the uninterrupted reference run. Four 4-rank launches of 8 steps (53 s on 2 cores at load 4, 78 s at
load 8-17, 102 s at load 20). The SLURM events are left to the benchmark (each needs the daemons and a requeue
hold); test_slurm.py covers one stop of each kind."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmarks.conftest import load_benchmark


def test_the_cluster_drill_survives_a_host_kill_and_a_kill_in_a_save_exactly(
    tmp_path: Path, shared_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    drill = load_benchmark("cluster_drill")
    summary = drill.main(["--events", "host-kill,save-kill", "--steps", "8", "--seed", "0", "--workdir",
                          str(tmp_path), "--tokenizer", str(shared_run / "tokenizer.json")])  # fmt: skip
    events = summary["events"]
    assert [e["kind"] for e in events] == ["host-kill", "save-kill"]
    assert summary["final_exit"] == 0
    for event in events:
        assert event["survived"] and event["exact"] and event["data_lost"] == 0, event
        assert event["resumed_at"] == event["newest_tag"], event
        # the survivors of a lost host stop on their own, naming the ranks they lost
        assert event["teardown_s"] <= drill.SURVIVORS_EXIT_S and event["stop"].startswith("E308: rank(s) "), event
        assert event["stop"].endswith(f" on {event['host']}"), event
    data = summary["data"]
    assert data["steps_logged"] == data["steps"] == 8 and data["token_gap"] == 0 and data["position_gap"] == 0
    assert data["tags"] == 4 and data["positions"] == 16  # tags 2, 4, 6, 8 on 4 ranks
    assert "| total | 2 events |" in capsys.readouterr().out
