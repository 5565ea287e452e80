"""Every process group of a run waits the run's timeout (--dist-timeout-minutes), DeepSpeed's own included: its
expert-parallel and expert-data-parallel groups come from `deepspeed.comm.new_group(ranks)`, which passes no timeout,
so they kept torch's default (30 minutes on gloo, 10 on NCCL) whatever the run said."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lumina_ds.distributed.env import DistInfo
from lumina_ds.distributed.group_timeout import groups_wait
from tests.runs import call_on_ranks


def timeout_of(group: Any) -> timedelta:
    """How long a collective on `group` waits: its backend's setting (gloo here)."""
    return group._get_backend(torch.device("cpu")).options._timeout


def test_a_group_made_inside_the_block_waits_its_minutes_and_one_made_after_the_default(
    process_group: DistInfo,
) -> None:
    with groups_wait(7):
        inside = dist.new_group([0])
    after = dist.new_group([0])
    assert timeout_of(inside) == timedelta(minutes=7)
    assert timeout_of(after) == timedelta(minutes=30)  # torch 2.13's default for gloo


def build_expert_parallel_engine_and_print_group_timeouts() -> None:
    from deepspeed.utils import groups
    from torch.distributed import distributed_c10d as c10d

    from lumina_ds.config.presets import get_preset
    from lumina_ds.distributed.env import init_distributed
    from lumina_ds.training.engine import build_engine, build_model

    run = get_preset("debug")
    run.distributed.timeout_minutes, run.distributed.expert_parallel_size, run.distributed.zero_stage = 7, 2, 2
    info = init_distributed(timeout_minutes=run.distributed.timeout_minutes)
    build_engine(build_model(run, world_size=2, precision="fp32"), run, info=info, total_steps=2, precision="fp32")
    print("EP", timeout_of(groups._get_expert_parallel_group("ep_size_2")).total_seconds())
    print("EDP", timeout_of(groups._get_expert_data_parallel_group("ep_size_2")).total_seconds())
    from lumina_ds.distributed.collectives import _CONTROL_GROUP

    every = sorted({timeout_of(group).total_seconds() for group in c10d._world.pg_map if group not in _CONTROL_GROUP})
    print("GROUPS", len(c10d._world.pg_map), "TIMEOUTS", every)
    print("CONTROL", timeout_of(_CONTROL_GROUP[0]).total_seconds())
    dist.barrier()


def test_deepspeeds_expert_parallel_groups_get_the_runs_timeout(tmp_path: Path) -> None:
    proc = call_on_ranks(build_expert_parallel_engine_and_print_group_timeouts, cwd=tmp_path, n=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("EP 420.0") == 2 and proc.stdout.count("EDP 420.0") == 2
    # the default group and DeepSpeed's: every one of them; the control group keeps its own bound (collectives.py)
    assert proc.stdout.count("TIMEOUTS [420.0]") == 2, proc.stdout
    assert proc.stdout.count("CONTROL 120.0") == 2, proc.stdout
