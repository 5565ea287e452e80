"""Process environment: CPU fallback, rendezvous variables for launcher-less runs, process-group start."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


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
    """A run started without a launcher is rank 0 of 1; a unique port keeps parallel runs from colliding.

    Without all five variables DeepSpeed falls back to MPI discovery, which needs mpi4py and forces port 29500.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        return
    if "OMPI_COMM_WORLD_RANK" in os.environ or "PMI_RANK" in os.environ:
        return  # mpirun: DeepSpeed discovers ranks through mpi4py
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def limit_cpu_threads() -> None:
    """Several CPU ranks on few cores: one intra-op thread each is ~3x faster than oversubscribing."""
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
    if not cuda_available() and world > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))


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


def barrier() -> None:
    """Wait for every rank (a no-op in a process without a process group)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def exit_process(code: int) -> None:
    """End a process that may have run distributed: sync, flush, and leave through os._exit.

    torch's gloo teardown can abort with SIGABRT after a clean finish (DEEPSPEED_FACTS.md); skipping interpreter
    teardown avoids it. Callers close their files and writers first (os._exit runs no cleanup).
    """
    import sys

    import torch.distributed as dist

    if not dist.is_initialized():
        sys.exit(code)
    try:
        dist.barrier()
    except RuntimeError:  # a peer already died: report failure
        code = code or 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Start (or join) the default process group: NCCL on GPUs, gloo on CPU."""
    configure_accelerator()
    ensure_rendezvous_env()
    limit_cpu_threads()
    import deepspeed
    import torch.distributed as dist

    quiet_deepspeed()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")))
    if cuda_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device)
