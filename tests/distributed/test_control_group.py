"""A rank other than 0 waiting for every rank (`all_ranks_arrive`, before an emergency checkpoint) while rank 0 is
elsewhere: gloo's monitored barrier bounds only rank 0's wait by the time asked; the others waited for the group's
timeout (the run's 2 hours), while rank 0 waited for them in its next collective. The control group's own timeout
now bounds them (CONTROL_TIMEOUT_S; 3 s here)."""

from __future__ import annotations

import time
from pathlib import Path

from tests.runs import call_on_ranks

RANK0_AWAY_S = 20.0


def rank_1_waits_while_rank_0_is_away() -> None:
    from lumina_ds.distributed import collectives
    from lumina_ds.distributed.env import init_distributed

    info = init_distributed()
    collectives._CONTROL_GROUP.clear()
    collectives.create_control_group(timeout_s=3.0)  # collective: both ranks
    if info.rank == 0:
        time.sleep(RANK0_AWAY_S)  # in another collective, as far as rank 1 can tell
        return
    started = time.monotonic()
    arrival = collectives.all_ranks_arrive(timeout_s=1.0)
    print(f"ARRIVED {arrival.arrived} AFTER {time.monotonic() - started:.1f}", flush=True)


def test_a_rank_other_than_0_stops_waiting_after_the_control_groups_timeout(tmp_path: Path) -> None:
    done = call_on_ranks(rank_1_waits_while_rank_0_is_away, cwd=tmp_path, n=2)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("ARRIVED"))
    arrived, waited = line.split()[1], float(line.split()[3])
    assert arrived == "False" and waited < RANK0_AWAY_S / 2, line  # before rank 0 came back
