"""Dropless expert parallelism's rank load: the factor memory plans allow (models/moe.py DROPLESS_IMBALANCE), checked
against the per-expert token counts a run logs, and the run's warning when its routing passes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from lumina_ds.models.moe import DROPLESS_IMBALANCE, rank_load_imbalance, worst_rank_load
from lumina_ds.monitor.callbacks import MoESummary
from tests.runs import read_metrics


def test_rank_load_groups_experts_in_blocks_as_expert_parallelism_places_them() -> None:
    counts = [[10.0, 30.0, 20.0, 20.0], [40.0, 0.0, 0.0, 40.0]]  # 2 layers x 4 experts
    # EP 2: ranks hold experts {0, 1} and {2, 3}; layer 0 loads 40/40, layer 1 40/40: even
    assert rank_load_imbalance(counts, 2) == 1.0
    # EP 4: one expert per rank; layer 1's busiest expert has 40 of a mean 20
    assert rank_load_imbalance(counts, 4) == 2.0
    assert rank_load_imbalance([[5.0, 5.0, 0.0, 0.0]], 2) == 2.0 == worst_rank_load(4, 2, 2)  # all on one rank
    assert worst_rank_load(128, 8, 8) == 8.0  # Qwen3-30B-A3B at EP 8: every copy of a token could go to one rank


@pytest.mark.parametrize("ep", [2, 4])
def test_the_debug_runs_logged_loads_stay_within_what_plans_allow(shared_run: Path, ep: int) -> None:
    """Every logged step of the shared `debug` run (4 experts, top-2, load-balancing loss on), grouped as EP 2 and
    EP 4 would place the experts: the busiest rank stays within DROPLESS_IMBALANCE of the mean."""
    logs = [r for r in read_metrics(shared_run)[0] if r.get("expert_counts")]
    assert len(logs) >= 10
    loads = [rank_load_imbalance(r["expert_counts"], ep) for r in logs]
    assert max(loads) <= DROPLESS_IMBALANCE
    assert max(loads) > 1.05  # the routing is uneven: the check has something to bound


def test_a_run_whose_routing_passes_the_planned_load_is_told_once(capsys: pytest.CaptureFixture[str]) -> None:
    summary = MoESummary(expert_parallel_size=2, planned_load=1.5, rank_load=rank_load_imbalance)
    even = {"step": 1, "expert_counts": [[10, 10, 10, 10]]}
    summary.on_log(even)
    assert even["expert_rank_load"] == 1.0 and capsys.readouterr().err == ""
    for step in (2, 3):
        record = {"step": step, "expert_counts": [[30, 10, 5, 5]]}  # 40 of a mean 25 on rank 0
        summary.on_log(record)
        assert record["expert_rank_load"] == pytest.approx(1.6)
    err = capsys.readouterr().err
    assert err.count("warning: at step 2 one rank's experts received 1.60x the mean load") == 1
    assert "allows 1.5x" in err and "--load-balancing-weight" in err
    one = {"step": 1, "expert_counts": [[30, 10, 5, 5]]}
    MoESummary().on_log(one)  # EP 1: every expert is local, nothing to bound
    assert "expert_rank_load" not in one
