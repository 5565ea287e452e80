"""`import-hf DIR --output RUN`: a Hugging Face model directory becomes a lumina-ds run directory.

The run holds config.yaml (the model as lumina-ds reads it), the tokenizer with the model's own chat template, and
checkpoints/step_00000000 with the weights under our names and nothing else ("weights_only" in its complete.json):
`chat`, `export` and `train --init-from` read it; a resume does not (there is no optimizer state to resume).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from lumina_ds.config.io import save_config
from lumina_ds.config.run import RunConfig
from lumina_ds.errors import ConfigError
from lumina_ds.hf.common import staging_dir
from lumina_ds.hf.source import ModelSource, check_tokenizer_fits, open_hf_dir
from lumina_ds.run_dir import (
    CHECKPOINTS_DIR,
    COMPLETE_MARKER,
    CONFIG_FILE,
    TOKENIZER_FILE,
    tag_for_step,
    write_shards,
)


@dataclass(frozen=True)
class ImportReport:
    run_dir: Path
    arch: str
    parameters: int
    bytes_written: int
    seconds: float


def _save_tokenizer(source: ModelSource, run_dir: Path) -> None:
    from lumina_ds.tokenizer import ChatTokenizer

    if source.tokenizer_file is None:
        raise ConfigError(
            "E005",
            f"{source.path} has no {TOKENIZER_FILE}",
            "lumina-ds reads fast tokenizers (tokenizer.json); save one with transformers first",
        )
    check_tokenizer_fits(source.tokenizer_file, source.model)
    ChatTokenizer.from_file(source.tokenizer_file).save(run_dir / TOKENIZER_FILE)


def _run_config(source: ModelSource, run_dir: Path) -> RunConfig:
    run = RunConfig()
    run.model = source.model
    run.model_source = str(source.path)
    run.logging.output_dir, run.logging.experiment_name = str(run_dir.parent), run_dir.name
    run.data.tokenizer = str(run_dir / TOKENIZER_FILE)
    return run


def _write_weights(source: ModelSource, tag_dir: Path, *, max_shard_bytes: int) -> int:
    files = write_shards(((name, source.read(name)) for name in source.names), tag_dir, max_shard_bytes=max_shard_bytes)
    meta = {
        "weights_only": True,
        "step": 0,
        "time": time.time(),
        "imported_from": str(source.path),
        "architecture": source.arch,
    }
    (tag_dir / COMPLETE_MARKER).write_text(json.dumps(meta, indent=2) + "\n")  # last: the tag is complete
    return sum(path.stat().st_size for path in files)


def import_hf(directory: str | Path, output: str | Path, *, max_shard_mb: int = 5120) -> ImportReport:
    """Convert a Hugging Face model directory into a run directory (E005/E303 before anything is written)."""
    started = time.perf_counter()
    source = open_hf_dir(Path(directory).expanduser())
    if source.warning:
        print(source.warning, flush=True)
    output = Path(output).expanduser()
    staging = staging_dir(output, ".importing")
    _save_tokenizer(source, staging)
    run = _run_config(source, output)
    run.validate()
    save_config(run, staging / CONFIG_FILE)
    tag_dir = staging / CHECKPOINTS_DIR / tag_for_step(0)
    written = _write_weights(source, tag_dir, max_shard_bytes=max_shard_mb << 20)
    if output.exists():
        output.rmdir()  # checked empty above
    os.replace(staging, output)  # the run appears under its name only once complete
    return ImportReport(output, source.arch, _count(source), written, time.perf_counter() - started)


def _count(source: ModelSource) -> int:
    from lumina_ds.models.counting import count_parameters

    return int(count_parameters(source.model).total)
