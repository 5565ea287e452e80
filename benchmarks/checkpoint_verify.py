"""What verifying a checkpoint costs per GiB: xxh3-128 (what complete.json records) against blake2b, from disk (cold:
the file evicted from the page cache first, as after a restart on another node; warm: just written) and in memory.

    python benchmarks/checkpoint_verify.py [--gib 1] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lumina_ds.training.checkpoint_files import CHUNK, file_digest

HASHERS: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "blake2b": hashlib.blake2b}


def digest_file(path: Path, make: Callable[[], Any]) -> str:
    digest = make()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return str(digest.hexdigest())


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (no root needed), so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="size of the test file in GiB")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write it (the checkpoint disk)")
    args = parser.parse_args()
    size = int(args.gib * 2**30)
    block = os.urandom(64 << 20)
    with tempfile.NamedTemporaryFile(dir=args.dir, delete=False) as handle:
        path = Path(handle.name)
        for offset in range(0, size, len(block)):
            handle.write(block[: min(len(block), size - offset)])
    try:
        assert file_digest(path) == digest_file(path, xxhash.xxh3_128)  # the benchmark measures what we record
        print(f"{args.gib:g} GiB file in {args.dir}; seconds per GiB (lower is better)")
        for name, make in HASHERS.items():
            evict(path)
            cold = timed(lambda make=make: digest_file(path, make)) / args.gib
            warm = timed(lambda make=make: digest_file(path, make)) / args.gib
            in_memory = timed(lambda make=make: make(block).hexdigest()) * 16  # 64 MiB -> per GiB
            print(f"  {name:9s} cold {cold:6.2f} s   warm {warm:6.2f} s   in memory {in_memory:6.3f} s")
    finally:
        path.unlink()


if __name__ == "__main__":
    main()
