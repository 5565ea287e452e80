"""Records held in tables: JSON arrays, Parquet files (row groups), Arrow datasets (`save_to_disk`, the Hugging Face
cache), each with random access by row index so that every strategy, streaming included, can read them.

`datasets` is imported only for `save_to_disk` directories and hub names; Parquet is read with pyarrow alone.
"""

from __future__ import annotations

import functools
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lumina_ds.data.records.files import UTF8_BOM, reading
from lumina_ds.errors import DataError

PARQUET_CACHED_GROUPS = 2  # decoded row groups kept per process: sequential reads touch one or two at a time


class RowTable(Protocol):
    """Rows of one source, read by index; `columns` is None when records are free-form (a JSON array)."""

    columns: list[str] | None
    nbytes: int  # uncompressed size, for the strategy choice
    files: list[Path]  # what the rows are read from (their bytes key the prepared shards)
    fingerprint: str  # what keys them when there are no files (a dataset held in memory)

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> list[Any]:
        """Rows [start, stop) as Python objects."""

    def take(self, indices: Sequence[int]) -> list[Any]:
        """The given rows, in the given order."""


class JsonRows:
    """The records of a JSON array, decoded whole into memory (JSON cannot be read from the middle)."""

    def __init__(self, path: Path) -> None:
        with reading(path) as handle:
            data = handle.read()
        try:
            records = json.JSONDecoder(strict=False).decode(data.removeprefix(UTF8_BOM).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError("E110", f"{path} is not UTF-8: {exc}", "re-encode it as UTF-8") from exc
        except ValueError as exc:
            hint = "fix it, or write one record per line (JSONL): bad lines are then skipped one by one"
            raise DataError("E110", f"{path} is not a valid JSON array: {exc}", hint) from exc
        if not isinstance(records, list):
            hint = "write a JSON array of records, or one record per line (JSONL)"
            raise DataError("E110", f"{path} holds a JSON {type(records).__name__}, not an array", hint)
        self.records = records
        self.columns: list[str] | None = None
        self.nbytes = len(data)
        self.files, self.fingerprint = [path], ""

    def __len__(self) -> int:
        return len(self.records)

    def read(self, start: int, stop: int) -> list[Any]:
        return self.records[start:stop]

    def take(self, indices: Sequence[int]) -> list[Any]:
        return [self.records[i] for i in indices]


class ParquetRows:
    """A Parquet file read by row group: a row is found by the group's first row, the last groups read stay decoded
    (as Arrow columns; rows become Python objects only when asked for). Only `columns` are decoded."""

    def __init__(self, path: Path, *, columns: Sequence[str] | None = None) -> None:
        import pyarrow.parquet as pq

        try:
            meta = pq.read_metadata(path)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError("E110", f"{path} is a damaged Parquet file: {exc}", "write it again") from exc
        self.path = path
        names = list(meta.schema.to_arrow_schema().names)
        self.columns: list[str] | None = names
        self._read = [c for c in columns if c in names] if columns is not None else None  # None: all
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.nbytes = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
        self.files, self.fingerprint = [path], ""
        self._file: Any = None
        self._pid = 0
        self._groups: OrderedDict[int, Any] = OrderedDict()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_groups": OrderedDict()}

    def _group(self, group: int) -> Any:
        """Row group `group` as an Arrow table (decoded once, kept among the last few)."""
        if self._file is None or self._pid != os.getpid():  # a forked loader worker opens its own handle
            import pyarrow.parquet as pq

            self._file, self._pid, self._groups = pq.ParquetFile(self.path), os.getpid(), OrderedDict()
        if group not in self._groups:
            self._groups[group] = self._file.read_row_group(group, columns=self._read)
            while len(self._groups) > PARQUET_CACHED_GROUPS:
                self._groups.popitem(last=False)
        self._groups.move_to_end(group)
        return self._groups[group]

    def read(self, start: int, stop: int) -> list[Any]:
        rows: list[Any] = []
        while start < stop:
            group = int(np.searchsorted(self._starts, start, side="right")) - 1
            end = min(stop, int(self._starts[group + 1]))
            first = int(self._starts[group])
            rows += self._group(group).slice(start - first, end - start).to_pylist()
            start = end
        return rows

    def take(self, indices: Sequence[int]) -> list[Any]:
        groups = np.searchsorted(self._starts, np.asarray(indices, dtype=np.int64), side="right") - 1
        rows: list[Any] = [None] * len(indices)
        for group in np.unique(groups).tolist():
            slots = np.flatnonzero(groups == group)
            local = np.asarray(indices, dtype=np.int64)[slots] - self._starts[group]
            for slot, row in zip(slots.tolist(), self._group(group).take(local).to_pylist(), strict=True):
                rows[slot] = row
        return rows


class ArrowRows:
    """A `datasets.Dataset`: memory-mapped Arrow files, so any row is read directly (and a pickled copy for a loader
    worker maps the same files instead of copying them)."""

    def __init__(self, dataset: Any, *, columns: Sequence[str] | None = None) -> None:
        if dataset._indices is not None:  # a selection of rows: write it out so that row i is table row i
            dataset = dataset.flatten_indices()
        self._data = dataset.data  # datasets' MemoryMappedTable: pickled as its file paths
        names = list(dataset.column_names)
        self.columns: list[str] | None = names
        self._read = [c for c in columns if c in names] if columns is not None else names
        self.files = [Path(f["filename"]) for f in dataset.cache_files]
        self.fingerprint = str(dataset._fingerprint)  # datasets' hash of its content and transforms
        self.nbytes = sum(f.stat().st_size for f in self.files) if self.files else int(dataset.data.nbytes)

    def __len__(self) -> int:
        return int(self._data.num_rows)

    def read(self, start: int, stop: int) -> list[Any]:
        rows: list[Any] = self._data.table.select(self._read).slice(start, stop - start).to_pylist()
        return rows

    def take(self, indices: Sequence[int]) -> list[Any]:
        rows: list[Any] = self._data.table.select(self._read).take(list(indices)).to_pylist()
        return rows


def _datasets() -> Any:
    """The `datasets` module, with its progress bars and warnings off (lumina-ds reports what it loaded)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    return datasets


def _one_split(loaded: Any, split: str | None, where: str) -> Any:
    """The split asked for; else the only one, else "train"; E113 listing the splits otherwise."""
    datasets = _datasets()
    if isinstance(loaded, datasets.Dataset):
        if split is not None and split != str(loaded.split or split):
            raise DataError("E113", f"{where} holds one split ({loaded.split}), not {split!r}", "drop the @SPLIT")
        return loaded
    names = list(loaded)
    chosen = split if split is not None else names[0] if len(names) == 1 else "train" if "train" in names else None
    if chosen not in names:
        asked = f"no split {split!r}" if split is not None else "several splits and none is 'train'"
        raise DataError("E113", f"{where} has {asked}: {', '.join(names)}", f"name one: {where}@{names[0]}")
    return loaded[chosen]


def load_saved(path: Path, split: str | None) -> Any:
    """A `save_to_disk` directory (a Dataset, or one split of a DatasetDict)."""
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError) as exc:
        hint = "save it again with Dataset.save_to_disk(DIR)"
        raise DataError("E113", f"{path} is not a readable datasets save_to_disk directory: {exc}", hint) from exc
    return _one_split(loaded, split, str(path))


@functools.lru_cache(maxsize=8)
def load_hub(name: str, config: str | None, split: str | None) -> Any:
    """A hub dataset through `datasets.load_dataset`, from the local cache when offline (loaded once per process)."""
    datasets = _datasets()
    where = f"hf://{name}" + (f":{config}" if config else "") + (f"@{split}" if split else "")
    try:
        loaded = datasets.load_dataset(name, config, split=split)
    except ConnectionError as exc:
        raise _offline(name, config, where) from exc
    except (FileNotFoundError, ValueError) as exc:  # DatasetNotFoundError is a FileNotFoundError
        if datasets.config.HF_HUB_OFFLINE and "cache" in str(exc).lower():
            raise _offline(name, config, where) from exc
        raise DataError("E113", f"{where} cannot be loaded: {exc}", "check the name, config and split") from exc
    return _one_split(loaded, split, where)


def _offline(name: str, config: str | None, where: str) -> DataError:
    from huggingface_hub import constants

    datasets = _datasets()
    offline = " (HF_HUB_OFFLINE is set)" if datasets.config.HF_HUB_OFFLINE else ""
    args = repr(name) + (f", {config!r}" if config else "")
    return DataError(
        "E113",
        f"{where} is not in the local Hugging Face cache and the hub cannot be reached{offline}: looked in "
        f"{datasets.config.HF_DATASETS_CACHE} (datasets) and {constants.HF_HUB_CACHE} (downloads)",
        f"download it where there is network, with the same HF_HOME, then copy that cache here: python -c "
        f'"import datasets; datasets.load_dataset({args})"; or save it with Dataset.save_to_disk(DIR) and pass DIR',
    )
