"""`export RUN|TAG --output DIR`: a lumina-ds checkpoint becomes a Hugging Face model directory, verified.

The consolidated weights of the tag (written by every run, whatever its ZeRO stage or expert-parallel size) are read
one tensor at a time, renamed (experts split out) and written in shards: host memory stays near one shard.
The export is built in `<DIR>.exporting` and renamed once complete, so an interrupted export leaves nothing under DIR.
Its dtype is, unless chosen, the one the checkpoint stores: an export that was not asked to round loses nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lumina_ds.errors import CheckpointError, ConfigError
from lumina_ds.hf.common import staging_dir
from lumina_ds.hf.source import HF_CONFIG_FILE, ModelSource, open_run_source
from lumina_ds.hf.verify import Verification, verify_export, why_not_verified
from lumina_ds.run_dir import write_shards
from lumina_ds.tokenizer import ChatTokenizer

EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}
GENERATION_CONFIG_FILE = "generation_config.json"


@dataclass(frozen=True)
class ExportReport:
    out_dir: Path
    arch: str
    bytes_written: int
    seconds: float
    verification: Verification | None
    skipped: str = ""  # why there is no verification
    dtype: str = "fp32"  # the export's weights dtype (a key of EXPORT_DTYPES)
    stored_dtype: str = "fp32"  # what the checkpoint stores, in the same names ("fp16", "fp64" beside them)

    @property
    def mb_per_s(self) -> float:
        return self.bytes_written / 1e6 / max(self.seconds, 1e-9)


def parse_size(text: str) -> int:
    """ "5GB", "500MB", "2GiB", "1000000" -> bytes (E002 for anything else)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    value = text.strip().upper()
    number = value.rstrip("KMGIB")
    try:
        size = int(float(number) * units[value[len(number) :]])
    except (ValueError, KeyError):
        raise ConfigError("E002", f"--max-shard-size {text!r} is not a size", "write e.g. 5GB or 500MB") from None
    if size < 10**6:
        raise ConfigError("E002", f"--max-shard-size {text} is under 1 MB", "write e.g. 5GB or 500MB")
    return size


def dtype_name(dtype: torch.dtype | None) -> str:
    """ "bf16", "fp32", "fp16" or "fp64": what --dtype and the messages call a dtype (None: no floating weights)."""
    names = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16", torch.float64: "fp64"}
    return names.get(dtype, str(dtype)) if dtype is not None else "none"


def default_dtype(source: ModelSource) -> str:
    """The checkpoint's stored dtype when an export can hold it, else fp32 (fp16 and fp64 are not written: fp32
    holds fp16 exactly and is the nearest to fp64)."""
    return "bf16" if source.stored_dtype == torch.bfloat16 else "fp32"


def _token_ids(tokenizer: ChatTokenizer) -> dict[str, Any]:
    ids: dict[str, Any] = {"eos_token_id": tokenizer.end_id, "pad_token_id": tokenizer.pad_id}
    if tokenizer.codec is None:
        ids["bos_token_id"] = tokenizer.bos_id
    return ids


def _generation_config(tokenizer: ChatTokenizer, token_ids: dict[str, Any]) -> dict[str, Any]:
    """End of turn (and a template's EOS) stop generation, as they stop `lumina-ds chat`."""
    stops = sorted(tokenizer.stop_ids)
    config = {**token_ids, "eos_token_id": stops[0] if len(stops) == 1 else stops}
    return {**config, "do_sample": False}


def _hf_tensors(source: ModelSource, arch: str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    from lumina_ds.hf.weights import ours_to_hf

    for name, tensor in ours_to_hf(source.model, arch, source.names, source.read):
        yield name, tensor.to(dtype)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def export_run(
    path: str | Path,
    output: str | Path,
    *,
    arch: str = "auto",
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 10**9,
    verify: bool = True,
) -> ExportReport:
    """Write the newest complete tag under `path` (or that tag) as a Hugging Face model directory in `dtype` (None:
    the dtype its weights are stored in), then verify it with transformers when it is installed (E306 when
    transformers cannot load it; the caller judges `verification.passed`, the export stays for inspection)."""
    from lumina_ds.hf.architectures import export_architecture, hf_config_from_model

    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ConfigError("E002", f"--dtype {dtype!r} is not supported", f"use one of {', '.join(EXPORT_DTYPES)}")
    source = open_run_source(Path(path).expanduser())
    dtype = dtype or default_dtype(source)
    name = export_architecture(source.model, arch=arch)  # E005 before anything is written
    if source.tokenizer_file is None:
        raise CheckpointError("E303", f"the run of {source.path} has no tokenizer.json", "copy it into the run dir")
    tokenizer = ChatTokenizer.from_file(source.tokenizer_file)
    token_ids = _token_ids(tokenizer)
    hf_config = hf_config_from_model(source.model, arch=name, torch_dtype=TORCH_DTYPE_NAMES[dtype], token_ids=token_ids)
    output = Path(output).expanduser()
    started = time.perf_counter()
    staging = staging_dir(output, ".exporting")
    files = write_shards(_hf_tensors(source, name, EXPORT_DTYPES[dtype]), staging, max_shard_bytes=max_shard_bytes)
    _write_json(staging / HF_CONFIG_FILE, hf_config)
    _write_json(staging / GENERATION_CONFIG_FILE, _generation_config(tokenizer, token_ids))
    tokenizer.export_files(staging)
    written = sum(f.stat().st_size for f in files)
    if output.exists():
        output.rmdir()  # checked empty above
    os.replace(staging, output)
    seconds = time.perf_counter() - started
    skipped = why_not_verified(source) if verify else "--no-verify"
    checked = None if skipped else verify_export(output, source, tokenizer, dtype=EXPORT_DTYPES[dtype])
    stored = dtype_name(source.stored_dtype)
    return ExportReport(output, name, written, seconds, checked, skipped or "", dtype=dtype, stored_dtype=stored)
