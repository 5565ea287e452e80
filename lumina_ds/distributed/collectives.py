"""Small collectives every rank calls together: sums, agreement on a flag or a minimum, and whether a directory is
shared by all ranks (each is a no-op, or the local answer, in a process without a process group)."""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce(values: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce over ranks (NCCL needs the tensor on the GPU; gloo takes it on the CPU); returned on the CPU."""
    if not _distributed():
        return values
    work = values.cuda() if dist.get_backend() == "nccl" else values.clone()
    dist.all_reduce(work, op=op)
    return work.cpu()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    return all_reduce(values, dist.ReduceOp.SUM)


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on at least one: ranks that disagree would wait on each other forever."""
    return float(all_reduce_sum(torch.tensor([1.0 if flag else 0.0]))[0]) > 0


def min_over_ranks(value: int) -> int:
    """The smallest of every rank's `value`, on every rank (so that ranks decide alike)."""
    return int(all_reduce(torch.tensor([value], dtype=torch.float64), dist.ReduceOp.MIN)[0])


def broadcast_token(rank: int) -> str:
    """A random token drawn by rank 0, the same on every rank."""
    token = [secrets.token_hex(8) if rank == 0 else None]
    if _distributed():
        dist.broadcast_object_list(token, src=0)
    assert token[0] is not None
    return token[0]


def shared_by_all_ranks(directory: Path, *, rank: int) -> bool:
    """Whether every rank sees the file rank 0 writes in `directory` (one file system for all nodes).

    Collective. With per-node directories at the same path, ranks on other nodes read nothing, or another file.
    """
    if not _distributed():
        return True
    token = broadcast_token(rank)
    probe = directory / f".lumina-shared-check-{token}"
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    dist.barrier()
    try:
        seen = probe.read_text() == token
    except OSError:
        seen = False
    shared = not any_rank(not seen)  # also a barrier: nobody reads after rank 0 removes the probe
    if rank == 0:
        probe.unlink(missing_ok=True)
    return shared


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (picklable values; small ones: it goes through the host)."""
    if not _distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


_CONTROL_GROUP: list[Any] = []  # a gloo group for agreement that must not wait behind the training collectives
# The longest `all_ranks_arrive` waits on a rank other than 0: gloo's monitored barrier bounds rank 0's wait by its
# argument, the others' (a send to rank 0 and its answer) only by the group's timeout, which was the run's 2 hours.
CONTROL_TIMEOUT_S = 120.0


def create_control_group(*, timeout_s: float = CONTROL_TIMEOUT_S) -> None:
    """Collective, once at start: a gloo side group (NCCL or not) for `all_ranks_arrive`."""
    if _distributed() and not _CONTROL_GROUP:
        _CONTROL_GROUP.append(dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)))


@dataclass(frozen=True)
class Arrival:
    """How this rank's wait in `all_ranks_arrive` ended."""

    arrived: bool
    seconds: float = 0.0  # how long this rank waited
    timed_out: bool = False  # it waited the whole timeout; else the group failed first (or there was none)
    missing: tuple[int, ...] = ()  # who did not arrive, as rank 0 sees it (gloo names the first); () elsewhere
    cause: str = ""  # why a wait failed, in the backend's words


def all_ranks_arrive(*, timeout_s: float) -> Arrival:
    """Whether every rank calls this within `timeout_s`: a rank stuck in another collective never arrives, and the
    caller learns it instead of hanging (on a rank other than 0, after the control group's timeout at the latest:
    CONTROL_TIMEOUT_S). A rank whose process is gone closes its connections, and the wait fails at once rather than
    after `timeout_s`. Without a control group only a single process can tell."""
    if not _distributed():
        return Arrival(arrived=True)
    if not _CONTROL_GROUP:
        return Arrival(arrived=False, cause="there is no control group to wait on")
    started = time.monotonic()
    try:
        dist.monitored_barrier(group=_CONTROL_GROUP[0], timeout=timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        return failed_arrival(str(exc), seconds=time.monotonic() - started, timeout_s=timeout_s)
    return Arrival(arrived=True, seconds=time.monotonic() - started)


_MISSING_RANK = re.compile(r"Rank (\d+) failed to pass monitoredBarrier")
_SOURCE_LOCATION = re.compile(r"^\[[^\]]*\]:?\s*")  # gloo's "[.../pair.cc:553] " before its message


def failed_arrival(error: str, *, seconds: float, timeout_s: float) -> Arrival:
    """A monitored barrier's RuntimeError read: gloo says "Rank N failed to pass monitoredBarrier in T ms" both when
    T ran out and when rank N's connection closed after a second, so the time waited tells them apart; its original
    exception ("Timed out waiting", "Connection closed by peer") is the cause."""
    original = error.split("Original exception:", 1)[-1]
    first_line = next((line.strip() for line in original.splitlines() if line.strip()), "")
    cause = _SOURCE_LOCATION.sub("", first_line).split(". ", 1)[0]
    return Arrival(
        arrived=False,
        seconds=seconds,
        timed_out=seconds >= 0.95 * timeout_s,  # gloo ends a timed-out wait a few ms after timeout_s
        missing=tuple(int(rank) for rank in _MISSING_RANK.findall(error)),
        cause=cause,
    )
