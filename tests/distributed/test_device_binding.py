"""Which GPU a rank binds, and which one DeepSpeed will bind, under the launch environments that decide it: `srun
--gpus-per-task=1` (one GPU visible per task, SLURM_LOCALID up to 3), every GPU visible to every rank, and the
layouts that have no sensible mapping. CUDA and DeepSpeed's process-group start are faked in this process; what
DeepSpeed reads is read with its own helper (deepspeed.comm.utils.get_local_rank_from_launcher)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lumina_ds.distributed import env
from lumina_ds.errors import ConfigError

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                    "MASTER_PORT", env.REAL_LOCAL_RANK)  # fmt: skip


@pytest.fixture
def launch_env() -> Iterator[None]:
    """init_distributed writes the rendezvous variables into os.environ: put the test process's back."""
    saved = dict(os.environ)
    for name in LAUNCH_VARIABLES:
        os.environ.pop(name, None)
    yield
    os.environ.clear()
    os.environ.update(saved)


def srun_task(*, local_id: int, tasks: int, visible: str) -> None:
    """The variables srun gives task `local_id` of a one-node step (launch/slurm/train.sbatch)."""
    os.environ.update(SLURM_PROCID=str(local_id), SLURM_STEP_NUM_TASKS=str(tasks), SLURM_LOCALID=str(local_id),
                      SLURM_STEP_NUM_NODES="1", SLURM_STEP_TASKS_PER_NODE=str(tasks), SLURM_JOB_ID="4242",
                      CUDA_VISIBLE_DEVICES=visible)  # fmt: skip


def start(monkeypatch: pytest.MonkeyPatch, *, gpus: int) -> tuple[Any, dict[str, Any]]:
    """init_distributed with `gpus` visible CUDA devices; what it bound, and what DeepSpeed read when it started."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.comm.utils import get_local_rank_from_launcher

    seen: dict[str, Any] = {"set_device": []}

    def init_deepspeed(**kwargs: Any) -> None:  # where deepspeed.comm binds device_id=cuda:LOCAL_RANK
        seen["deepspeed_local_rank"] = get_local_rank_from_launcher()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", seen["set_device"].append)
    monkeypatch.setattr(deepspeed, "init_distributed", init_deepspeed)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "get_rank", lambda: int(os.environ["RANK"]))
    monkeypatch.setattr(dist, "get_world_size", lambda: int(os.environ["WORLD_SIZE"]))
    monkeypatch.setattr(env, "create_control_group", lambda: None)
    return env.init_distributed(timeout_minutes=5), seen


def test_one_gpu_per_task_binds_cuda_0_for_this_process_and_for_deepspeed(
    launch_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: DeepSpeed bound cuda:3 (LOCAL_RANK) in a task that sees one GPU: "invalid device ordinal"."""
    srun_task(local_id=3, tasks=4, visible="3")
    info, seen = start(monkeypatch, gpus=1)
    assert info.device == torch.device("cuda", 0) and seen["set_device"] == [torch.device("cuda", 0)]
    assert seen["deepspeed_local_rank"] == 0  # the process group's device_id
    assert os.environ["LOCAL_RANK"] == "0"  # what deepspeed.initialize reads for set_device and zero.Init
    # lumina-ds keeps the task's place on its node: node-local preparation is local rank 0's alone
    assert (info.rank, info.local_rank, info.local_world_size) == (3, 3, 4)
    again, _ = start(monkeypatch, gpus=1)  # a second start in the process keeps it too
    assert again.local_rank == 3 and again.device == torch.device("cuda", 0)


def test_under_mpirun_deepspeeds_check_of_the_open_mpi_local_rank_agrees(
    launch_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeepSpeed's engine asserts LOCAL_RANK == OMPI_COMM_WORLD_LOCAL_RANK when the latter is set."""
    os.environ.update(OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_RANK="1",
                      OMPI_COMM_WORLD_LOCAL_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29512")  # fmt: skip
    info, seen = start(monkeypatch, gpus=1)
    assert os.environ["LOCAL_RANK"] == os.environ["OMPI_COMM_WORLD_LOCAL_RANK"] == "0"
    assert seen["deepspeed_local_rank"] == 0 and info.local_rank == 1


def test_every_gpu_visible_binds_the_local_ranks_gpu(launch_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    srun_task(local_id=3, tasks=4, visible="0,1,2,3")
    info, seen = start(monkeypatch, gpus=4)
    assert info.device == torch.device("cuda", 3) and seen["deepspeed_local_rank"] == 3
    assert os.environ["LOCAL_RANK"] == "3" and env.REAL_LOCAL_RANK not in os.environ


@pytest.mark.parametrize(("local_id", "gpus"), [(0, 2), (3, 2), (3, 3)])
def test_several_gpus_but_fewer_than_the_ranks_on_the_node_is_e003(
    launch_env: None, monkeypatch: pytest.MonkeyPatch, local_id: int, gpus: int
) -> None:
    """srun --gpus-per-task=2 with 4 tasks, or 3 GPUs for 4 ranks: ranks would share GPUs (NCCL refuses), and
    every rank of the node says so, not only those whose index is out of range."""
    srun_task(local_id=local_id, tasks=4, visible=",".join(map(str, range(gpus))))
    with pytest.raises(ConfigError) as err:
        start(monkeypatch, gpus=gpus)
    assert err.value.code == "E003"
    assert f"local rank {local_id} of 4 ranks on this node sees {gpus} GPUs" in str(err.value)
    assert "--gpus-per-task=1" in err.value.hint
