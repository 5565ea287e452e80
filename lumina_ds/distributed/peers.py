"""Which rank a failed collective lost. gloo reports a peer that died by its address ("Read error [10.0.0.1]:24482:
Connection reset by peer"), not by rank; every rank records at start where each rank runs (host name and the
address it reaches MASTER_ADDR from, the one gloo binds), so that the failure can name the ranks of the lost host."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

from lumina_ds.distributed import collectives
from lumina_ds.distributed.gloo_interface import source_address
from lumina_ds.errors import TrainingError

_PEER = re.compile(r"\[(\d+\.\d+\.\d+\.\d+)\]:\d+")
_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused")


@dataclass(frozen=True)
class Peer:
    rank: int
    host: str
    address: str


def where_ranks_run() -> list[Peer]:
    """Collective: every rank's (host, address), by rank."""
    here = (socket.gethostname(), source_address(os.environ.get("MASTER_ADDR", "127.0.0.1")) or "")
    gathered = collectives.all_gather_object(here)
    return [Peer(rank, host, address) for rank, (host, address) in enumerate(gathered)]


def lost_connection(exc: BaseException) -> bool:
    """Whether a failed collective lost its connection to a peer (the peer's process or host is gone)."""
    return any(cause in str(exc) for cause in _LOST)


def lost_peer_error(exc: BaseException, peers: list[Peer], *, rank: int) -> TrainingError | None:
    """E308 naming the ranks at the address a failed collective lost, or None when `exc` is no lost connection."""
    if not lost_connection(exc):
        return None
    addresses = set(_PEER.findall(str(exc)))
    lost = [p for p in peers if p.address in addresses and p.rank != rank]
    if lost:
        hosts = sorted({f"{p.host} ({p.address})" for p in lost})
        who = f"rank(s) {', '.join(str(p.rank) for p in lost)} on {', '.join(hosts)}"
    else:
        who = f"a peer at {', '.join(sorted(addresses)) or 'an unknown address'}"
    return TrainingError(
        "E308",
        f"rank {rank} lost contact with {who}: its process or host stopped mid-collective",
        "the job stops on every rank; relaunch it (the same command, or your scheduler's requeue) and it resumes from "
        "the last complete checkpoint; the lock the lost rank 0 left is taken over by the same job (docs/launch.md)",
    )
