"""What a data source holds, as a content hash independent of how it is read (the prepared-shard cache key and a
checkpoint's data fingerprint both use it), and the small atomic JSON writes of data preparation."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from lumina_ds.data.prepare import meter
from lumina_ds.data.records.sources import JSON, JSONL, DataSource, open_table, parse_source

HASH_PIECE = 1 << 20  # a file's content hash is a hash of 1 MiB pieces' hashes, so ranks can hash pieces apart
PIECES_PREFIX = "p1m:"  # marks a hash of pieces (a file of one piece keeps the plain blake2b of its bytes)


def piece_digest(handle: BinaryIO, start: int, stop: int) -> bytes:
    """blake2b of the bytes [start, stop) of an open file (one piece, read at once)."""
    handle.seek(start)
    block = handle.read(stop - start)
    meter.read(len(block))
    return hashlib.blake2b(block, digest_size=16).digest()


def pieces_of(size: int) -> list[tuple[int, int]]:
    """The byte ranges of a file of `size` bytes that are hashed apart (one, possibly empty, for a small file)."""
    return [(start, min(start + HASH_PIECE, size)) for start in range(0, max(size, 1), HASH_PIECE)]


def combine_pieces(size: int, digests: list[bytes]) -> str:
    """The content hash from the pieces' digests in order: a file of one piece hashes as its bytes did before
    pieces existed, so the cache keys and checkpoint fingerprints of small files are unchanged."""
    if size <= HASH_PIECE:
        return digests[0].hex()
    return PIECES_PREFIX + hashlib.blake2b(b"".join(digests), digest_size=16).hexdigest()


def memo_key(path: Path) -> str:
    """What a remembered hash is valid for: the file's path, size and modification time."""
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def remember(memo_dir: Path, hashes: dict[str, str]) -> None:
    """Add hashes (by `memo_key`) to the memo in `memo_dir` (one writer at a time: the caller's job)."""
    memo_file = memo_dir / "hashes.json"
    memo = read_json_or_empty(memo_file)
    memo.update(hashes)
    memo_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(memo_file, memo)


def content_hash(path: Path, *, memo_dir: Path | None = None) -> str:
    """The file's content hash (`combine_pieces`); remembered per (path, size, mtime) in `memo_dir` to skip
    re-reading big files."""
    key = memo_key(path)
    memo = read_json_or_empty(memo_dir / "hashes.json") if memo_dir else {}
    if key in memo:
        return str(memo[key])
    size = path.stat().st_size
    with path.open("rb") as handle:
        value = combine_pieces(size, [piece_digest(handle, a, b) for a, b in pieces_of(size)])
    if memo_dir is not None:
        remember(memo_dir, {key: value})
    return value


def source_files(location: str | Path | DataSource) -> tuple[list[Path], str]:
    """The files a source's content hash covers (the compressed bytes of a .gz, a table's files), and the dataset's
    own fingerprint for a source without files."""
    source = parse_source(location)
    table = None if source.kind in (JSONL, JSON) else open_table(source)
    if table is None:
        return [source.local], ""
    return list(table.files), table.fingerprint


def source_content(
    location: str | Path | DataSource, *, memo_dir: Path | None = None, known: Mapping[str, str] | None = None
) -> str:
    """What a source holds, independent of how it is read: its files' content hashes, or the dataset's own
    fingerprint when it has no files. `known` holds hashes already computed (by `memo_key`), e.g. by every rank's
    share of the pieces (data/prepare/survey.py)."""
    files, fingerprint = source_files(location)
    known = known or {}
    hashes = []
    for path in files:
        key = memo_key(path)
        hashes.append(known[key] if key in known else content_hash(path, memo_dir=memo_dir))
    return "|".join(hashes) or fingerprint


def read_json_or_empty(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def temp_path(target: Path) -> Path:
    """A sibling temp name no other process picks: host, pid (for the abandoned-build cleanup) and a random token
    (pids repeat across containers that share a file system, and so can host names)."""
    return target.with_name(f".{target.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = temp_path(path)
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
