"""What a data source holds, as a content hash independent of how it is read (the prepared-shard cache key and a
checkpoint's data fingerprint both use it), and the small atomic JSON writes of data preparation."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
from pathlib import Path
from typing import Any

from lumina_ds.data.records.sources import JSON, JSONL, DataSource, open_table, parse_source


def content_hash(path: Path, *, memo_dir: Path | None = None) -> str:
    """blake2b of the file's bytes; remembered per (path, size, mtime) in `memo_dir` to skip re-reading big files."""
    stat = path.stat()
    memo_file = memo_dir / "hashes.json" if memo_dir else None
    memo_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo = read_json_or_empty(memo_file) if memo_file else {}
    if memo_key in memo:
        return str(memo[memo_key])
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    value = digest.hexdigest()
    if memo_file is not None:
        memo[memo_key] = value
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(memo_file, memo)
    return value


def source_content(location: str | Path | DataSource, *, memo_dir: Path | None = None) -> str:
    """What a source holds, independent of how it is read: its files' content hashes (the compressed bytes of a .gz,
    a table's files), or the dataset's own fingerprint when it has no files."""
    source = parse_source(location)
    table = None if source.kind in (JSONL, JSON) else open_table(source)
    files = [source.local] if table is None else table.files
    return "|".join(content_hash(f, memo_dir=memo_dir) for f in files) or (table.fingerprint if table else "")


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
