"""Content hashes and line offsets of the input files, computed once for the job.

The ranks of a team each read a consecutive share of the files' 1 MiB pieces (data/prepare/content.py hashes pieces
so that they can), hashing them and finding their line starts in the same pass. The writer remembers the hashes
(hashes.json, by path, size and mtime) and caches the offsets of streamed files by content (line-offsets/), so a
second run, or another rank, reads no input byte for them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lumina_ds.data.prepare import meter
from lumina_ds.data.prepare.content import combine_pieces, memo_key, pieces_of, read_json_or_empty, remember, temp_path
from lumina_ds.data.prepare.team import Team, checked, exchange, together
from lumina_ds.errors import DataError

OFFSETS_DIR = "line-offsets"
Piece = tuple[int, int, int]  # (index of the file in the plan, start, stop)


@dataclass
class Facts:
    """What the survey found: content hashes by `memo_key`, line offsets of streamed files by path."""

    contents: dict[str, str]
    offsets: dict[str, np.ndarray]


@dataclass(frozen=True)
class _FilePlan:
    path: str
    size: int
    key: str  # memo_key
    known: str | None  # its remembered content hash
    offsets_file: str | None  # its cached line offsets
    wants_offsets: bool

    @property
    def scan(self) -> bool:
        return self.known is None or (self.wants_offsets and self.offsets_file is None)


def offsets_file(memo_dir: Path, path: Path, content: str) -> Path:
    return memo_dir / OFFSETS_DIR / f"{path.stem}-{content.replace(':', '-')}.npy"


def _plan(files: Sequence[Path], streamed: Collection[str], memo_dir: Path) -> list[_FilePlan]:
    memo = read_json_or_empty(memo_dir / "hashes.json")
    plans = []
    for path in files:
        key, wants = memo_key(path), str(path) in streamed
        known = memo.get(key)
        cached = offsets_file(memo_dir, path, known) if wants and known else None
        hit = str(cached) if cached is not None and cached.is_file() else None
        plans.append(_FilePlan(str(path), path.stat().st_size, key, known, hit, wants))
    return plans


def owned(team: Team, sizes: Sequence[int]) -> list[int]:
    """Indices of the consecutive items whose first byte falls in this member's share of all their bytes."""
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])[:-1]
    total = int(sum(sizes))
    bounds = [total * r // team.size for r in range(team.size)]
    owners = np.minimum(np.searchsorted(bounds, starts, side="right") - 1, team.size - 1)
    return [i for i, owner in enumerate(owners.tolist()) if owner == team.rank]


def _scan(plans: Sequence[_FilePlan], pieces: Sequence[Piece], mine: Sequence[int]) -> tuple[list[bytes], np.ndarray]:
    """Digests of this member's pieces, and the line starts in them (of files whose offsets are wanted)."""
    digests, starts = [], []
    for index in mine:
        file, start, stop = pieces[index]
        with open(plans[file].path, "rb") as handle:
            handle.seek(start)
            block = handle.read(stop - start)
        meter.read(len(block))
        digests.append(hashlib.blake2b(block, digest_size=16).digest())
        found = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10) + start + 1
        starts.append(found.astype(np.int64) if plans[file].wants_offsets else np.zeros(0, np.int64))
    counts = np.array([len(s) for s in starts], dtype=np.int64)
    return digests, np.concatenate([counts, *starts])


def survey(files: Sequence[Path], streamed: Collection[str], team: Team, *, memo_dir: Path) -> Facts:
    """Content hashes of `files` and line offsets of those named in `streamed`, each input byte read by one member
    of the team (none when remembered). Collective."""
    plans = team.agree(lambda: _plan(files, streamed, memo_dir))
    pieces = [(i, a, b) for i, plan in enumerate(plans) if plan.scan for a, b in pieces_of(plan.size)]
    mine = owned(team, [b - a for _, a, b in pieces])
    digests_here, packed_here = checked(team, lambda: _scan(plans, pieces, mine))
    owners = together(team, lambda: (mine, digests_here))
    packed = exchange(team, memo_dir, [packed_here])
    digests: dict[int, bytes] = {}
    starts: dict[int, np.ndarray] = {}
    for (indices, member_digests), (member_packed,) in zip(owners, packed, strict=True):
        counts, rest = member_packed[: len(indices)], member_packed[len(indices) :]
        for index, digest, part in zip(indices, member_digests, np.split(rest, np.cumsum(counts)[:-1]), strict=False):
            digests[index], starts[index] = digest, part
    facts = Facts({}, {})
    by_file: dict[int, list[int]] = {}
    for p, piece in enumerate(pieces):
        by_file.setdefault(piece[0], []).append(p)
    for i, plan in enumerate(plans):
        file_pieces = by_file.get(i, [])
        if plan.scan:
            facts.contents[plan.key] = combine_pieces(plan.size, [digests[p] for p in file_pieces])
        else:
            assert plan.known is not None
            facts.contents[plan.key] = plan.known
        if plan.wants_offsets and plan.scan:
            facts.offsets[plan.path] = _offsets([starts[p] for p in file_pieces], plan.size)
    checked(team, lambda: _load_cached(plans, facts))
    checked(team, lambda: _write(team, plans, facts, memo_dir))
    return facts


def _offsets(starts: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Line offsets as `scan_line_offsets` gives them, from the line starts found in a file's pieces."""
    offsets = np.concatenate([np.zeros(1, np.int64), *starts])
    return offsets if offsets[-1] == size else np.append(offsets, np.int64(size))


def _load_cached(plans: Sequence[_FilePlan], facts: Facts) -> None:
    for plan in plans:
        if plan.wants_offsets and not plan.scan:
            assert plan.offsets_file is not None
            offsets = np.load(plan.offsets_file)
            if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != plan.size:
                raise DataError("E109", f"line offsets {plan.offsets_file} do not match {plan.path}",
                                f"delete {plan.offsets_file}")  # fmt: skip
            facts.offsets[plan.path] = offsets


def _write(team: Team, plans: Sequence[_FilePlan], facts: Facts, memo_dir: Path) -> None:
    """The writer remembers new hashes and caches new offsets (atomically: another job may read them)."""
    if not team.writer:
        return
    fresh = {plan.key: facts.contents[plan.key] for plan in plans if plan.scan}
    if fresh:
        remember(memo_dir, fresh)
    for plan in plans:
        if plan.wants_offsets and plan.scan:
            target = offsets_file(memo_dir, Path(plan.path), facts.contents[plan.key])
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_path(target)
            with tmp.open("wb") as handle:
                np.save(handle, facts.offsets[plan.path])
            os.replace(tmp, target)
