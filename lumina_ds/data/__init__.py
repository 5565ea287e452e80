"""Chat data, in four stages: `records` (files, formats, tables, sources, line checks), `validate` (the report of
`validate-data`), `prepare` (tokenized documents in RAM or as shards, token counts) and `loading` (mixture, the global
resumable row order, packing, batches).

Two doors lead in from the rest of the package: this module for the data commands (validate, prepare, sample text;
nothing here imports torch), and `lumina_ds.data.train_data` for training (`build_train_data`).
"""

from lumina_ds.data.prepare.tokenize import EncodeSettings, PrepareReport, prepare_source
from lumina_ds.data.records.checks import LineLimit
from lumina_ds.data.records.formats import RecordFormat, parse_fields
from lumina_ds.data.records.reader import sample_texts
from lumina_ds.data.records.sources import check_input_files, parse_source, parse_train_data
from lumina_ds.data.validate.validator import Validator, quiet_line, summary_lines, validate_files

__all__ = [
    "EncodeSettings",
    "LineLimit",
    "PrepareReport",
    "RecordFormat",
    "Validator",
    "check_input_files",
    "parse_fields",
    "parse_source",
    "parse_train_data",
    "prepare_source",
    "quiet_line",
    "sample_texts",
    "summary_lines",
    "validate_files",
]
