"""Opening data files: plain or gzip-compressed JSONL, anything else named in one line (E110), lines of bounded size.

A file is recognised by its first bytes, not its name: gzip content is read transparently when the name ends in
`.gz` and refused with the rename to make when it does not; UTF-16/UTF-32 text and other compressions are refused
with the command that converts them. A UTF-8 byte-order mark is accepted (many Windows tools write one).
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lumina_ds.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"
SKIP_BYTES = 1 << 20  # how much of an over-long line is read at a time while skipping it
HEAD_BYTES = 200  # the start of an over-long line kept for reports
SIZE_SAMPLE_BYTES = 4 << 20  # compressed bytes decompressed to estimate a .gz file's JSONL size

# leading bytes -> (what the file is, the command that turns it, read from a file or stdin, into UTF-8)
_SIGNATURES: tuple[tuple[bytes, str, str], ...] = (
    (b"\x00\x00\xfe\xff", "UTF-32 text (big-endian, with a byte-order mark)", "iconv -f UTF-32 -t UTF-8"),
    (b"\xff\xfe\x00\x00", "UTF-32 text (little-endian, with a byte-order mark)", "iconv -f UTF-32 -t UTF-8"),
    (b"\xfe\xff", "UTF-16 text (big-endian, with a byte-order mark)", "iconv -f UTF-16 -t UTF-8"),
    (b"\xff\xfe", "UTF-16 text (little-endian, with a byte-order mark)", "iconv -f UTF-16 -t UTF-8"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "zstd -dc"),
    (b"\xfd7zXZ\x00", "xz-compressed", "xz -dc"),
    (b"BZh", "bzip2-compressed", "bunzip2 -c"),
    (b"PK\x03\x04", "a zip archive", "unzip -p"),
)
_DATA_SUFFIXES = (".gz", ".zst", ".xz", ".bz2", ".zip", ".jsonl")
# UTF-16/32 without a byte-order mark: where the NUL bytes are among the first four (UTF-8 JSON never has one)
_NUL_PATTERNS = (("UTF-32LE", "x000"), ("UTF-32BE", "000x"), ("UTF-16LE", "x0x0"), ("UTF-16BE", "0x0x"))


@dataclass(frozen=True)
class LongLine:
    """A line longer than the byte limit, not held in memory: its size (without the line end) and its first bytes."""

    size: int
    head: bytes


def is_gzip(path: str | Path) -> bool:
    """Whether a data file is read through gzip (its name ends in .gz; `check_data_file` checks the content)."""
    return str(path).endswith(".gz")


def _without_bom(first: bytes) -> tuple[str, str] | None:
    """UTF-16/UTF-32 without a byte-order mark, or binary data: NUL bytes among the first four."""
    if len(first) < 4 or b"\x00" not in first:
        return None
    shape = "".join("0" if b == 0 else "x" for b in first)
    for source, pattern in _NUL_PATTERNS:
        if shape == pattern:
            endian = "little" if source.endswith("LE") else "big"
            return f"{source[:6]} text ({endian}-endian, no byte-order mark)", f"iconv -f {source} -t UTF-8"
    return "binary data (NUL bytes), not text", ""


def describe(first: bytes) -> tuple[str, str] | None:
    """What a file starting with `first` is when it is not UTF-8 text or gzip, and how to convert it."""
    if first.startswith(UTF8_BOM) or first.startswith(GZIP_MAGIC):
        return None
    for magic, what, how in _SIGNATURES:
        if first.startswith(magic) and (magic != b"BZh" or first[3:4].isdigit()):
            return what, how
    return _without_bom(first[:4])


def _not_jsonl(path: Path, what: str, command: str, *, gzipped: bool = False) -> DataError:
    """E110 naming what the file is, with the command line that writes it as UTF-8 JSONL beside it."""
    stem = path.name
    while stem.endswith(_DATA_SUFFIXES):
        stem = stem[: stem.rindex(".")]
    if not command:
        return DataError("E110", f"{path} is {what}, not UTF-8 JSONL", "export the data as UTF-8 JSONL")
    convert = f"gunzip -c {path.name} | {command}" if gzipped else f"{command} {path.name}"
    hint = f"convert it: {convert} > {stem}.utf8.jsonl"
    return DataError("E110", f"{path} is {'gzip-compressed ' if gzipped else ''}{what}, not UTF-8 JSONL", hint)


def check_data_file(path: str | Path) -> Path:
    """The path of an existing data file that is UTF-8 text, plain or gzip-compressed: E104 if missing, E110 if it is
    anything else (named from its first bytes)."""
    path = Path(path)
    if not path.is_file():
        hint = "Check the path; expected a .jsonl, .jsonl.gz, .json or .parquet file, a save_to_disk directory or hf://NAME."
        raise DataError("E104", f"data file not found: {path}", hint)
    with path.open("rb") as handle:
        first = handle.read(4)
    if first.startswith(GZIP_MAGIC) and not is_gzip(path):
        raise DataError(
            "E110",
            f"{path} is gzip-compressed but its name does not end in .gz",
            f"rename it to {path.name}.gz (lumina-ds reads .jsonl.gz files directly) or gunzip it",
        )
    problem = describe(first)
    if problem is not None:
        raise _not_jsonl(path, *problem)
    if is_gzip(path):
        if not first.startswith(GZIP_MAGIC):
            raise DataError(
                "E110", f"{path} ends in .gz but is not gzip-compressed", f"rename it without .gz: {path.name[:-3]}"
            )
        with reading(path) as handle:
            inner = describe(handle.read(4))
        if inner is not None:
            raise _not_jsonl(path, *inner, gzipped=True)
    return path


def _damaged(path: Path, exc: Exception) -> DataError:
    return DataError(
        "E110",
        f"{path} is a damaged gzip file: {exc}",
        "the file was cut short or corrupted; compress it again (`gzip -t FILE` checks one)",
    )


@contextmanager
def reading(path: str | Path) -> Iterator[BinaryIO]:
    """The file's bytes, decompressed when it is a .gz; a damaged gzip stream is E110 naming the file."""
    path = Path(path)
    with gzip.open(path, "rb") if is_gzip(path) else path.open("rb") as handle:
        try:
            yield handle  # type: ignore[misc]  # GzipFile and BufferedReader are both binary files
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise _damaged(path, exc) from exc


def data_bytes(path: str | Path) -> int:
    """Size of the JSONL text: exact for a plain file; for a .gz, exact when it is one gzip member of at most 4 MiB,
    else estimated from the compression ratio of its first 4 MiB."""
    path = Path(path)
    size = path.stat().st_size
    if not is_gzip(path):
        return size
    inflate = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
    with path.open("rb") as handle:
        sample = handle.read(SIZE_SAMPLE_BYTES)
    try:
        inflated = len(inflate.decompress(sample, 16 * SIZE_SAMPLE_BYTES))  # bounded: a 4 MiB sample of blanks
    except zlib.error as exc:
        raise _damaged(path, exc) from exc
    if inflate.eof and not inflate.unused_data and len(sample) == size:
        return inflated
    used = len(sample) - len(inflate.unconsumed_tail) - len(inflate.unused_data)
    return round(inflated / max(used, 1) * size)


def read_line(handle: BinaryIO, *, max_bytes: int, whole: bool = False) -> bytes | LongLine:
    """The next line (b"" at the end of the file). A line of more than `max_bytes` (line end not counted) is read
    in pieces and returned as a LongLine, so memory stays bounded, unless `whole` asks for all its bytes."""
    first = handle.readline(max_bytes + 1)
    if first.endswith(b"\n") or len(first) <= max_bytes:
        return first
    pieces, size, raw = [first], len(first), first
    while not raw.endswith(b"\n") and (raw := handle.readline(SKIP_BYTES)):
        size += len(raw)
        if whole:
            pieces.append(raw)
    if whole:
        return b"".join(pieces)
    return LongLine(size=size - raw.endswith(b"\n"), head=first[:HEAD_BYTES])


def iter_lines(handle: BinaryIO, *, max_bytes: int, whole: bool = False) -> Iterator[bytes | LongLine]:
    """Every line of a binary handle, as `read_line` returns it."""
    while raw := read_line(handle, max_bytes=max_bytes, whole=whole):
        yield raw


def skip_line(handle: BinaryIO) -> None:
    """Move past the current line without holding it in memory."""
    while (raw := handle.readline(SKIP_BYTES)) and not raw.endswith(b"\n"):
        pass
