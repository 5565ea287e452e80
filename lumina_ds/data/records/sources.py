"""Data sources: what `--train-data`, `--eval-data`, `validate-data` and `prepare-data` accept, and how their records
are numbered, read and told apart.

A source is a JSONL file (plain or .gz; a `.json` of JSON lines too), a `.json` array of records, a Parquet file, a
`datasets` `save_to_disk` directory (`DIR[@SPLIT]`) or a hub dataset `hf://NAME[:CONFIG][@SPLIT]` loaded through
`datasets` (from its cache when offline). Records are numbered from 1: by line in a JSONL file (blank lines count),
by row everywhere else. Each source's record format is decided once (data/formats.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from lumina_ds.config.run import DataConfig
from lumina_ds.data.records.checks import LineLimit, is_blank
from lumina_ds.data.records.files import UTF8_BOM, LongLine, check_data_file, data_bytes, is_gzip, iter_lines, reading
from lumina_ds.data.records.formats import FORMATS, MESSAGES, REQUIRED, TITLES, RecordFormat, Row, parse_fields
from lumina_ds.data.records.tables import ArrowRows, JsonRows, ParquetRows, RowTable, load_hub, load_saved
from lumina_ds.errors import ConfigError, DataError

JSONL, JSON, PARQUET, ARROW, HUB = "jsonl", "json", "parquet", "arrow", "hub"
HF_PREFIX = "hf://"
PARQUET_MAGIC = b"PAR1"
DETECT_RECORDS = 1000  # records of a JSONL file or JSON array searched for one whose format is recognised
ROWS_PER_READ = 1024
_SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what Dataset / DatasetDict.save_to_disk write
_WEIGHT_SUFFIX = re.compile(r"^(?P<path>.+):(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")


@dataclass(frozen=True)
class DataSource:
    """One input as the user named it (`location`), what kind it is, and where it is read from."""

    location: str
    kind: str
    path: Path | None = None  # the file or directory (None for a hub dataset)
    dataset: str = ""  # hub name
    config: str | None = None
    split: str | None = None

    def __str__(self) -> str:
        return self.location

    @property
    def unit(self) -> str:
        """What a record number counts: lines of a JSONL file, rows of anything else."""
        return "line" if self.kind == JSONL else "row"

    @property
    def random_access(self) -> bool:
        """Whether a record can be read by its number without reading those before it (not in a .gz)."""
        return not (self.kind == JSONL and is_gzip(self.local))

    @property
    def local(self) -> Path:
        assert self.path is not None, f"{self.location} is not a local file"
        return self.path

    @property
    def stem(self) -> str:
        """A short file-system-safe name, for prepared-shard directories."""
        if self.kind == HUB:
            parts = [self.dataset.replace("/", "--"), self.config or "", self.split or ""]
            return "-".join(p for p in parts if p)
        name = self.local.name.removesuffix(".gz")
        base = name if self.kind == ARROW else Path(name).stem
        return f"{base}-{self.split}" if self.split else base


def parse_source(location: str | Path | DataSource) -> DataSource:
    """A source from its name: E104 if a local one is missing, E110 if a file is of no kind lumina-ds reads (both
    checked from the first bytes, before any work), E002 for a malformed hub name."""
    if isinstance(location, DataSource):
        return location
    text = str(location)
    if text.startswith(HF_PREFIX):
        return _hub_source(text)
    path, split = Path(text).expanduser(), None
    base, at, name = text.rpartition("@")
    if at and not path.exists() and Path(base).expanduser().is_dir():
        path, split = Path(base).expanduser(), name
    if path.is_dir():
        if not any((path / marker).is_file() for marker in _SAVED_MARKERS):
            hint = "pass a data file, or a directory written by Dataset.save_to_disk / DatasetDict.save_to_disk"
            raise DataError("E110", f"{path} is a directory, not a datasets save_to_disk directory", hint)
        return DataSource(text, ARROW, path, split=split)
    return DataSource(text, _file_kind(path), path)


def _hub_source(text: str) -> DataSource:
    rest = text[len(HF_PREFIX) :]
    name_config, at, split = rest.partition("@")
    name, colon, config = name_config.partition(":")
    if not name or (colon and not config) or (at and not split):
        raise ConfigError("E002", f"malformed hub dataset {text!r}", "write hf://NAME[:CONFIG][@SPLIT]")
    return DataSource(text, HUB, dataset=name, config=config or None, split=split or None)


def _file_kind(path: Path) -> str:
    """Parquet from its magic bytes; a `.json` array from its first character; JSONL otherwise (checked as such)."""
    if path.is_file():
        with path.open("rb") as handle:
            first = handle.read(4)
        if first == PARQUET_MAGIC:
            return PARQUET
        if path.suffix == ".parquet":
            raise DataError("E110", f"{path} ends in .parquet but is not Parquet (no PAR1 magic)", "write it again")
    check_data_file(path)  # E104 when missing, E110 for other encodings and compressions
    if path.name.removesuffix(".gz").endswith(".json"):
        with reading(path) as handle:
            start = handle.read(1 << 16).removeprefix(UTF8_BOM).lstrip()
        if start.startswith(b"["):
            return JSON
    return JSONL


@dataclass(frozen=True)
class OpenSource:
    """A source with its record format decided; `table` is None for JSONL files (read line by line)."""

    source: DataSource
    record_format: RecordFormat
    table: RowTable | None = None

    def limit(self, limit: LineLimit) -> LineLimit:
        """The line limit with this source's record format."""
        return replace(limit, record_format=self.record_format)


def open_table(source: DataSource, *, columns: list[str] | None = None) -> RowTable:
    """The rows of a source that is not JSONL (only `columns` are decoded from Parquet and Arrow)."""
    if source.kind == JSON:
        return JsonRows(source.local)
    if source.kind == PARQUET:
        return ParquetRows(source.local, columns=columns)
    if source.kind == ARROW:
        return ArrowRows(load_saved(source.local, source.split), columns=columns)
    assert source.kind == HUB, source.kind
    return ArrowRows(load_hub(source.dataset, source.config, source.split), columns=columns)


def open_source(location: str | Path | DataSource, record_format: RecordFormat) -> OpenSource:
    """A source with its record format: forced, or detected from its table's columns or its first records."""
    source = parse_source(location)
    if source.kind == JSONL:
        return OpenSource(source, _detect_in_records(source, record_format, numbered_lines(source, LineLimit())))
    table = open_table(source)
    if table.columns is None:
        rows = ((i + 1, Row(r)) for i, r in enumerate(table.read(0, DETECT_RECORDS)))
        return OpenSource(source, _detect_in_records(source, record_format, rows), table)
    fmt = _format_of_columns(source, record_format, table.columns)
    columns = fmt.columns(fmt.name)
    return OpenSource(source, fmt, open_table(source, columns=columns) if columns != table.columns else table)


def _format_of_columns(source: DataSource, fmt: RecordFormat, columns: list[str]) -> RecordFormat:
    """A table's format from its column names; E112 when none fits (or a forced one's columns are missing)."""
    name = fmt.name if fmt.name != "auto" else fmt.detect(columns)
    missing = [fmt.key(f) for f in REQUIRED[name] if fmt.key(f) not in columns] if name else []
    if name is None or missing:
        expected = "; ".join(f"{n}: {' + '.join(REQUIRED[n])}" for n in FORMATS)
        wanted = f"no column {', '.join(missing)} for --data-format {name}" if name else "no record format fits"
        raise DataError(
            "E112",
            f"{source}: {wanted} (columns: {', '.join(columns)})",
            f"formats and the columns they need: {expected}; name yours with --data-fields, e.g. "
            "instruction=question,output=answer",
        )
    origin = "forced by --data-format" if fmt.name != "auto" else f"{TITLES[name]} detected from its columns"
    return replace(fmt, name=name, origin=origin)


def _detect_in_records(
    source: DataSource, fmt: RecordFormat, records: Iterator[tuple[int, bytes | LongLine | Row]]
) -> RecordFormat:
    """The format of the first of the first DETECT_RECORDS records that has one; messages when none has."""
    if fmt.name != "auto":
        return replace(fmt, origin="forced by --data-format")
    for number, raw in records:
        if number > DETECT_RECORDS:
            break
        obj = _decoded(number, raw)
        name = fmt.detect(obj) if isinstance(obj, dict) else None
        if name is not None:
            return replace(fmt, name=name, origin=f"{TITLES[name]} detected from {source.unit} {number}")
    return replace(fmt, name=MESSAGES, origin=f"no known format in its first {DETECT_RECORDS:,} records")


def _decoded(number: int, raw: bytes | LongLine | Row) -> object:
    if isinstance(raw, Row):
        return raw.value
    if isinstance(raw, LongLine):
        return None
    try:
        return json.loads(raw.removeprefix(UTF8_BOM) if number == 1 else raw)
    except ValueError:  # bad JSON or UTF-8: that line's own check reports it
        return None


def numbered_lines(source: DataSource, limit: LineLimit) -> Iterator[tuple[int, bytes | LongLine]]:
    """`(line_no, raw)` of every line of a JSONL source, decompressed if .gz; a line past the limit is a LongLine
    unless it is cut."""
    with reading(source.local) as handle:
        yield from enumerate(iter_lines(handle, max_bytes=limit.max_bytes, whole=limit.truncate), start=1)


def numbered_records(opened: OpenSource, limit: LineLimit) -> Iterator[tuple[int, bytes | LongLine | Row]]:
    """`(number, raw)` of every record: JSONL lines as bytes, table rows as Rows."""
    if opened.table is None:
        yield from numbered_lines(opened.source, limit)
        return
    for start in range(0, len(opened.table), ROWS_PER_READ):
        rows = opened.table.read(start, min(start + ROWS_PER_READ, len(opened.table)))
        yield from ((start + i + 1, Row(row)) for i, row in enumerate(rows))


def source_bytes(source: DataSource) -> int:
    """The size the strategy choice counts: JSONL text (a .gz's estimated), a table's uncompressed bytes."""
    if source.kind in (JSONL, JSON):
        return data_bytes(source.local)
    return open_table(source).nbytes


def require_conversation_lines(location: str | Path | DataSource) -> None:
    """E105 when a source has no record but blank lines (or none): it cannot give training a single conversation."""
    source = parse_source(location)
    if source.kind != JSONL:
        if len(open_table(source)) == 0:
            raise DataError("E105", f"{source} has no rows: no conversation to train on", "Check the source.")
        return
    lines = 0
    for line_no, raw in numbered_lines(source, LineLimit()):
        if isinstance(raw, LongLine) or not is_blank(line_no, raw):
            return
        lines = line_no
    what = "is empty" if lines == 0 else f"holds only {lines:,} blank line(s)"
    raise DataError(
        "E105", f"{source} {what}: no conversation to train on", "Check the path, or drop the file from the data."
    )


@dataclass(frozen=True)
class SourceSpec:
    """One training source and its mixing weight (copies of each conversation per epoch, on average)."""

    source: DataSource
    weight: float = 1.0


def parse_train_data(spec: str) -> list[SourceSpec]:
    """`a.jsonl,b.parquet:0.3,hf://org/chats@train:2` -> sources; a missing file is E104, one of no kind lumina-ds
    reads E110, a bad weight E002."""
    sources = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        match = _WEIGHT_SUFFIX.match(item)
        location, weight = (match["path"], float(match["weight"])) if match else (item, 1.0)
        if weight <= 0:
            raise ConfigError("E002", f"mixing weight of {location} must be positive, got {weight}", "write FILE:0.5")
        sources.append(SourceSpec(parse_source(location), weight))
    if not sources:
        raise ConfigError("E002", "no training data given", "pass --train-data FILE.jsonl[,FILE2.parquet:WEIGHT]")
    return sources


def record_format_of(data: DataConfig) -> RecordFormat:
    """The record format the run's flags ask for (--data-format, --data-fields); E002 for a malformed one."""
    return RecordFormat(data.data_format, parse_fields(data.data_fields))


def check_input_files(data: DataConfig) -> None:
    """Every input of a run exists (E104), is of a kind lumina-ds reads (E110) with a readable record format (E112)
    or loads (E113), and every training source holds a record (E105): checked before any tokenizer is trained or
    data tokenized."""
    if not data.train_data:
        raise ConfigError("E002", "no training data given", "pass --train-data FILE.jsonl")
    fmt = record_format_of(data)
    for spec in parse_train_data(data.train_data):
        require_conversation_lines(spec.source)
        open_source(spec.source, fmt)
    if data.tokenizer and not Path(data.tokenizer).expanduser().is_file():
        raise DataError("E104", f"tokenizer file not found: {data.tokenizer}", "check the path")
    if data.eval_data:
        try:
            open_source(data.eval_data, fmt)
        except DataError as exc:
            if exc.code == "E104":
                raise DataError("E104", f"evaluation data file not found: {data.eval_data}", exc.hint) from exc
            raise
