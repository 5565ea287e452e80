"""Which launcher started this process, and this rank's place in the job, read from the environment alone.

Pure: nothing here starts a process group or talks to other ranks, so `check-environment --json` can show what a
rank would resolve to when a launch misbehaves. `env.ensure_rendezvous_env` turns the result into the variables
torch's env:// rendezvous needs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from lumina_ds.errors import ConfigError

# (rank, world size) and the (local rank, ranks on this node) variables of each MPI-style launcher, first match wins
OPEN_MPI = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")
OPEN_MPI_LOCAL = (("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),)
PMI = ("PMI_RANK", "PMI_SIZE")
# Hydra (MPICH, Intel MPI) names the local rank MPI_LOCALRANKID; Cray PMI and PMIx-based PMI shims PMI_LOCAL_RANK
PMI_LOCAL = (("MPI_LOCALRANKID", "MPI_LOCALNRANKS"), ("PMI_LOCAL_RANK", "PMI_LOCAL_SIZE"))
SLURM = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS")
# where a local rank may be found when the launcher's own variables lack it, in order of trust
LOCAL_RANK_FALLBACKS = ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_LOCAL_RANK", "MPI_LOCALRANKID")
LOCAL_WORLD_VARIABLES = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")  # torchrun, deepspeed's per-node launcher


@dataclass(frozen=True)
class Launch:
    """This rank as its launcher describes it; master_* are None where rank 0 must tell the others (mpi4py)."""

    launcher: str  # env (torchrun, deepspeed), openmpi, pmi (MPICH/Intel Hydra, Cray PMI), slurm, none
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    master_port: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def detect_launch(environ: Mapping[str, str]) -> Launch:
    """torchrun/deepspeed's variables win; then Open MPI; then srun (before PMI: Slurm's pmi2 and Cray PMI plugins set
    PMI_RANK in every task too); then Hydra/Cray PMI; else rank 0 of 1."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return _env_launch(environ)
    if all(name in environ for name in OPEN_MPI):
        return _mpi_launch(environ, "openmpi", OPEN_MPI, OPEN_MPI_LOCAL)
    if all(name in environ for name in SLURM):
        return _slurm_launch(environ)
    if all(name in environ for name in PMI):
        return _mpi_launch(environ, "pmi", PMI, PMI_LOCAL)
    return Launch("none", 0, 1, 0, 1, "127.0.0.1", environ.get("MASTER_PORT"))


def _env_launch(environ: Mapping[str, str]) -> Launch:
    rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
    local_world = next((int(environ[n]) for n in LOCAL_WORLD_VARIABLES if n in environ), None)
    names = ("LOCAL_RANK", *LOCAL_RANK_FALLBACKS)
    local_rank = next((int(environ[n]) for n in names if n in environ), None)
    if local_rank is None:
        if world > 1 and local_world != world:  # ranks may span nodes: the global rank is no GPU index
            raise _no_local_rank("RANK/WORLD_SIZE", rank, world)
        local_rank = rank
    local_world = local_world if local_world is not None else world
    return Launch("env", rank, world, local_rank, local_world, *_master(environ))


def _mpi_launch(
    environ: Mapping[str, str], launcher: str, names: tuple[str, str], local: tuple[tuple[str, str], ...]
) -> Launch:
    rank, world = int(environ[names[0]]), int(environ[names[1]])
    found = next(((environ[r], environ.get(s)) for r, s in local if r in environ), None)
    if found is None:
        if world > 1:
            raise _no_local_rank(f"{names[0]}/{names[1]}", rank, world)
        found = ("0", "1")
    local_rank, local_world = int(found[0]), int(found[1]) if found[1] is not None else world
    return Launch(launcher, rank, world, local_rank, local_world, *_master(environ))


def _slurm_launch(environ: Mapping[str, str]) -> Launch:
    """A task started by `srun python ...` (launch/slurm/train.sbatch exports MASTER_ADDR)."""
    rank, world = int(environ["SLURM_PROCID"]), int(environ["SLURM_STEP_NUM_TASKS"])
    nodes = int(environ.get("SLURM_STEP_NUM_NODES", "1"))
    addr = environ.get("MASTER_ADDR") or ("127.0.0.1" if nodes == 1 else None)
    # every task derives the same port from the job id: no task can tell the others a free one
    port = environ.get("MASTER_PORT", str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000))
    local_rank = int(environ.get("SLURM_LOCALID", "0" if nodes == 1 else "-1"))
    if local_rank < 0:
        raise _no_local_rank("SLURM_PROCID", rank, world)
    return Launch("slurm", rank, world, local_rank, _slurm_tasks_here(environ, world, nodes), addr, port)


def _slurm_tasks_here(environ: Mapping[str, str], world: int, nodes: int) -> int:
    """Tasks on this node: SLURM_STEP_TASKS_PER_NODE is like `8(x2)` or `8,7`; the first count is a fair guess."""
    match = re.match(r"\d+", environ.get("SLURM_STEP_TASKS_PER_NODE", ""))
    if match:
        return int(match.group())
    return world // nodes if world % nodes == 0 else world


def _master(environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    return environ.get("MASTER_ADDR"), environ.get("MASTER_PORT")


def _no_local_rank(source: str, rank: int, world: int) -> ConfigError:
    return ConfigError(
        "E003",
        f"the launcher gave rank {rank} of {world} ({source}) but no local rank, so this rank cannot tell which GPU "
        "of its node is its own",
        "launch with torchrun or deepspeed (they set LOCAL_RANK), or export LOCAL_RANK (and LOCAL_WORLD_SIZE) per "
        "rank; `lumina-ds check-environment --json` shows what each rank resolves to",
    )
