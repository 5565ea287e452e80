"""The ranks that share one cache directory, and how they divide data preparation among themselves.

Every rank of the job sees the same prepared directory (a shared file system), or each node has its own at the same
path; a `Team` is the ranks behind one such directory. They split the work (each a consecutive share of the bytes),
write what is large (line offsets, token counts, shards) into the directory they share, and exchange what is small
through the job's all-gather. All teams make the same collective calls in the same order whatever their work (a
team with a warm cache still joins every gather), so that no rank waits on a collective another rank never makes.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

from lumina_ds.errors import DataError, LuminaError

T = TypeVar("T")


def _alone(value: Any) -> list[Any]:
    return [value]


@dataclass(frozen=True)
class Team:
    """This rank's place among the ranks that share one cache directory (one process: a team of one)."""

    rank: int = 0  # index within the team
    size: int = 1
    members: tuple[int, ...] = (0,)  # the team's ranks in the job (positions in `all_gather`'s answer), in order
    all_gather: Callable[[Any], list[Any]] = _alone  # every rank's value, on every rank of the job (collective)
    world_size: int = 1  # ranks in the job, over all teams

    @property
    def writer(self) -> bool:
        """The member that writes the team's shared files (caches, meta data) once the members' parts are in."""
        return self.rank == 0

    def share(self, total: int) -> tuple[int, int]:
        """This member's consecutive share [start, stop) of `total` units."""
        return total * self.rank // self.size, total * (self.rank + 1) // self.size

    def agree(self, decide: Callable[[], T]) -> T:
        """The writer's answer to `decide` on every member (only the writer looks: members that looked at another
        moment could see another state of the cache and take other branches). Collective."""
        answers: list[Any] = together(self, lambda: decide() if self.writer else None)
        return cast(T, answers[0])


SOLO = Team()  # one process, or a caller that divides nothing


def team_of(rank: int, node_of_rank: Sequence[int], *, shared: bool, all_gather: Callable[[Any], list[Any]]) -> Team:
    """The team of `rank`: every rank when the directory is `shared`, else the ranks on its node."""
    ranks = range(len(node_of_rank))
    members = tuple(ranks if shared else (r for r in ranks if node_of_rank[r] == node_of_rank[rank]))
    return Team(rank=members.index(rank), size=len(members), members=members, all_gather=all_gather,
                world_size=len(node_of_rank))  # fmt: skip


def _outcome(work: Callable[[], T]) -> tuple[bool, Any]:
    try:
        return True, work()
    except LuminaError as exc:
        return False, (type(exc), exc.code, exc.message, exc.hint)
    except OSError as exc:
        return False, (DataError, "E108", f"cannot read or write data files: {exc}", "check the disk and its space")


def _raise(failure: tuple[type[LuminaError], str, str, str]) -> None:
    kind, code, message, hint = failure
    raise kind(code, message, hint)


def together(team: Team, work: Callable[[], T]) -> list[T]:
    """Run `work` here, then gather every member's result in team order. If it failed on any rank of the job, every
    rank raises that error (the first failing rank's): none is left waiting in a later collective. Collective."""
    outcomes = team.all_gather(_outcome(work))
    for ok, value in outcomes:
        if not ok:
            _raise(value)
    return [outcomes[m][1] for m in team.members]


def checked(team: Team, work: Callable[[], T]) -> T:
    """`work`'s result, kept here; if it failed on any rank of the job, every rank raises. Collective."""
    ok, value = _outcome(work)
    together(team, lambda: None if ok else _raise(value))
    return cast(T, value)


def exchange(team: Team, parent: Path, arrays: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
    """Every member's `arrays` (as many on each), in team order. Large arrays go through files in a scratch directory
    under `parent` (the team shares it), not through the collective, which NCCL would stage on the GPU. Collective."""
    token = team.agree(lambda: secrets.token_hex(6))
    scratch = parent / f".exchange-{token}"

    def write() -> None:
        if team.size > 1:
            scratch.mkdir(parents=True, exist_ok=True)
            for i, array in enumerate(arrays):
                np.save(scratch / f"{team.rank}-{i}.npy", np.asarray(array))

    together(team, write)

    def read() -> list[list[np.ndarray]]:
        if team.size == 1:
            return [list(arrays)]
        return [[np.load(scratch / f"{m}-{i}.npy") for i in range(len(arrays))] for m in range(team.size)]

    parts = checked(team, read)  # every member has read before the writer removes the files
    if team.writer and team.size > 1:
        shutil.rmtree(scratch, ignore_errors=True)
    return parts
