"""Process environment: CPU fallback, rendezvous variables for launcher-less runs, process-group start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from lumina_ds.distributed.collectives import create_control_group
from lumina_ds.distributed.gloo_interface import choose_gloo_interface
from lumina_ds.distributed.group_timeout import groups_wait
from lumina_ds.distributed.launchers import LOCAL_WORLD_VARIABLES, detect_launch
from lumina_ds.errors import ConfigError


def cuda_available() -> bool:
    return torch.cuda.is_available()


def configure_accelerator() -> str:
    """Pick DeepSpeed's accelerator before deepspeed is imported: CUDA when present, else the CPU one."""
    if not cuda_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return os.environ.get("DS_ACCELERATOR", "cuda")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_rendezvous_env() -> None:
    """Give every rank the variables torch's env:// rendezvous needs, whatever started it (see launchers.py).

    torchrun and the deepspeed launcher set them; mpirun, Hydra/Cray PMI and srun set their own (translated here); a
    run started without a launcher is rank 0 of 1 on a free port, so parallel runs do not collide. DeepSpeed's own MPI
    discovery (used when any of them is missing) forces port 29500 and `hostname -I`'s first address, so it is never
    used.
    """
    launch = detect_launch(os.environ)
    if launch.launcher == "env":  # torchrun, deepspeed: keep theirs, fill in only what is missing
        for key, value in (("LOCAL_RANK", launch.local_rank), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", 29500)):
            os.environ.setdefault(key, str(value))
        return
    addr, port = launch.master_addr, launch.master_port
    if launch.launcher == "none":
        port = port or str(free_port())
    elif launch.launcher == "slurm" and addr is None:
        raise ConfigError(
            "E003",
            f"srun started {launch.world_size} tasks on several nodes but MASTER_ADDR is not set",
            "export MASTER_ADDR=<first host of the job> before srun (launch/slurm/train.sbatch does)",
        )
    elif addr is None or port is None:  # mpirun / PMI: rank 0 tells the others its address and a free port
        comm = mpi_world()
        single_node = launch.local_world_size == launch.world_size
        if addr is None:
            addr = comm.bcast(host_address(single_node=single_node) if launch.rank == 0 else None, root=0)
        if port is None:
            port = str(comm.bcast(free_port() if launch.rank == 0 else None, root=0))
    assert addr is not None and port is not None
    values = {"RANK": launch.rank, "WORLD_SIZE": launch.world_size, "LOCAL_RANK": launch.local_rank}
    if launch.launcher != "none":
        values["LOCAL_WORLD_SIZE"] = launch.local_world_size
    os.environ.update({**{k: str(v) for k, v in values.items()}, "MASTER_ADDR": addr, "MASTER_PORT": str(port)})


def mpi_world() -> Any:
    """mpi4py's COMM_WORLD (importing it initialises MPI; exit_process finalises it)."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ConfigError(
            "E003",
            f"started by mpirun without MASTER_ADDR/MASTER_PORT, and mpi4py is not installed ({exc})",
            "pip install 'lumina-ds[mpi]' (mpi4py), or pass -x MASTER_ADDR=<first host> -x MASTER_PORT=29500 to mpirun",
        ) from exc
    return MPI.COMM_WORLD


def host_address(*, single_node: bool) -> str:
    """Where the other ranks reach rank 0: loopback when all ranks share this host, else its first address."""
    if single_node:
        return "127.0.0.1"
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        out = []
    return out[0] if out else socket.gethostbyname(socket.gethostname())


def announced_local_world_size() -> int | None:
    """Ranks on this host where torchrun, deepspeed or the translations above say so; None where none did."""
    return next((int(os.environ[name]) for name in LOCAL_WORLD_VARIABLES if name in os.environ), None)


def local_world_size() -> int:
    """Ranks on this host (torchrun, deepspeed and the translations above say so), else the whole world."""
    announced = announced_local_world_size()
    return announced if announced is not None else int(os.environ.get("WORLD_SIZE", "1"))


def limit_cpu_threads() -> None:
    """Several CPU ranks on few cores: one share of the cores each is ~3x faster than oversubscribing."""
    ranks_here = local_world_size()
    if not cuda_available() and ranks_here > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_here))


def quiet_deepspeed() -> None:
    """DeepSpeed logs every init detail at INFO and torch warns about its deprecated collectives: keep the console
    for our own lines (LUMINA_DS_VERBOSE=1 restores them)."""
    if os.environ.get("LUMINA_DS_VERBOSE"):
        return
    import logging
    import warnings

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    # DeepSpeed's own barriers (checkpoint saves) in a 1-process GPU job: DeepSpeed binds no device_id there on
    # purpose, and torch warns that it uses the current device, which init_distributed set to this rank's GPU
    warnings.filterwarnings("ignore", message=r"barrier\(\): using the device under current context")


def barrier() -> None:
    """Wait for every rank (a no-op in a process without a process group)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    # NCCL: name this rank's GPU, else torch guesses it from the global rank (and warns that a guess can hang)
    dist.barrier(device_ids=[torch.cuda.current_device()] if dist.get_backend() == "nccl" else None)


def exit_process(code: int) -> None:
    """End a process that may have run distributed: sync (after success only), flush, and leave through os._exit.

    torch's gloo teardown can abort with SIGABRT after a clean finish (docs/deepspeed.md); skipping interpreter
    teardown avoids it. Callers close their files and writers first (os._exit runs no cleanup).
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        finalize_mpi()
        sys.exit(code)
    if code == 0:  # a failing rank leaves at once: its peers may wait in a collective it will never join
        try:
            barrier()
        except RuntimeError:  # a peer already died: report failure
            code = 1
    finalize_mpi()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def finalize_mpi() -> None:
    """A rank that initialised MPI (mpi4py) and skips MPI_Finalize is reported by mpirun as a failed job."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int  # ranks on this host
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SHM_COMM_OP = "deepspeed_shm_comm"


def skip_cpu_shm_allreduce() -> None:
    """Keep DeepSpeed from building and starting its CPU shared-memory allreduce op.

    Only DeepSpeed's inference all-reduce uses it; training reduces through gloo. Loading it JIT-compiles C++ under a
    lock file that a rank killed at the wrong moment leaves behind, and every later run on the machine then waits for
    that lock forever; starting it maps ~66 MiB per rank in /dev/shm that DeepSpeed never unlinks.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


REAL_LOCAL_RANK = "LUMINA_DS_LOCAL_RANK"  # this rank's place on its node, where LOCAL_RANK was set to its GPU


def choose_device(local_rank: int, local_world_size: int | None) -> torch.device:
    """This rank's GPU: the local rank's when every rank sees all of the node's GPUs (torchrun, deepspeed, mpirun);
    cuda:0 when it sees one (srun --gpus-per-task=1 gives each task its own CUDA_VISIBLE_DEVICES). Several GPUs but
    fewer than the ranks on the node (`local_world_size`, None where no launcher said) would put ranks on one GPU,
    which NCCL refuses: E003."""
    count = torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda", 0)
    if local_rank < count and count >= (local_world_size or 0):
        return torch.device("cuda", local_rank)
    ranks_here = f"{local_world_size} ranks" if local_world_size else "the ranks"
    raise ConfigError(
        "E003",
        f"local rank {local_rank} of {ranks_here} on this node sees {count} GPUs "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): ranks would share a GPU",
        "give each rank one GPU (srun --gpus-per-task=1) or every rank all of the node's GPUs, or start one rank per "
        "GPU (`lumina-ds check-environment --json` shows what each rank resolves to)",
    )


def bind_device(local_rank: int, local_world_size: int | None) -> torch.device:
    """Make this rank's GPU current, and the one DeepSpeed uses.

    DeepSpeed takes LOCAL_RANK for the device index: `init_process_group` binds `device_id=cuda:LOCAL_RANK`
    (deepspeed/comm/torch.py), the engine calls `set_device(LOCAL_RANK)` and zero.Init allocates there; under mpirun
    the engine asserts that OMPI_COMM_WORLD_LOCAL_RANK equals it. Where the GPU is not the local rank's (one visible
    per task), both become the GPU's index; lumina-ds keeps the real local rank in DistInfo.local_rank (node-local
    data preparation) and in REAL_LOCAL_RANK (for a later call).
    """
    device = choose_device(local_rank, local_world_size)
    torch.cuda.set_device(device)  # before the process group, so NCCL binds this GPU
    if device.index != local_rank:
        os.environ[REAL_LOCAL_RANK] = str(local_rank)
        os.environ["LOCAL_RANK"] = str(device.index)
        if "OMPI_COMM_WORLD_LOCAL_RANK" in os.environ:
            os.environ["OMPI_COMM_WORLD_LOCAL_RANK"] = str(device.index)
    return device


def init_distributed(*, timeout_minutes: int = 120) -> DistInfo:
    """Start (or join) the default process group: NCCL on GPUs, gloo on CPU; collectives wait `timeout_minutes`."""
    configure_accelerator()
    ensure_rendezvous_env()
    choose_gloo_interface()
    limit_cpu_threads()
    import deepspeed
    import torch.distributed as dist

    quiet_deepspeed()
    local_rank = int(os.environ.get(REAL_LOCAL_RANK, os.environ["LOCAL_RANK"]))
    device = torch.device("cpu")
    if cuda_available():
        device = bind_device(local_rank, announced_local_world_size())
    else:
        skip_cpu_shm_allreduce()
    with groups_wait(timeout_minutes):  # the control group too
        if not dist.is_initialized():
            backend = "nccl" if cuda_available() else "gloo"
            deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=timeout_minutes))
        create_control_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world_size(),
                    device=device)  # fmt: skip
