"""Where a model's weights come from: a Hugging Face model directory or a lumina-ds run, read tensor by tensor.

A Hugging Face directory is read as data only: config.json, safetensors (single or sharded with their index) and the
tokenizer files. Nothing in it is executed: no `trust_remote_code`, no pickles (`*.bin` weights are refused); a
config.json whose `auto_map` names such code gets a warning that it was not run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lumina_ds.errors import CheckpointError, ConfigError
from lumina_ds.models.config import ModelConfig
from lumina_ds.run_dir import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    SafetensorsFiles,
    resolve_checkpoint,
    run_dir_of,
    weights_files,
)

HF_CONFIG_FILE = "config.json"
TensorReader = Callable[[str], torch.Tensor]  # one of our parameter names -> its full tensor


@dataclass
class ModelSource:
    """A model to start from: its architecture, our parameter names and a reader for each, and its tokenizer."""

    path: Path
    kind: str  # "hf" (a Hugging Face model directory) or "lumina" (a run dir, checkpoints dir or tag)
    model: ModelConfig
    names: list[str]  # our parameter names, as Transformer.named_parameters() gives them
    read: TensorReader
    tokenizer_file: Path | None = None  # tokenizer.json; its chat template files sit beside it
    arch: str = ""  # the Hugging Face architecture (kind "hf")
    token_ids: dict[str, Any] = field(default_factory=dict)  # bos/eos/pad ids config.json states (kind "hf")
    stored_dtype: torch.dtype | None = None  # holds every stored floating tensor exactly (kind "lumina")
    warning: str | None = None  # what the caller should print before using it (remote code that was not run)


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / HF_CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            "E005", f"cannot read {path}: {exc}", "a Hugging Face model directory has a config.json"
        ) from exc
    if not isinstance(config, dict):
        raise ConfigError("E005", f"{path} is not a JSON object", "a Hugging Face model directory has a config.json")
    return config


# safetensors' header names of the floating dtypes a checkpoint can hold
_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_dtype(files: list[Path]) -> torch.dtype | None:
    """The dtype that holds every floating tensor of `files` exactly, read from their headers (no tensor is read):
    theirs when they agree, else the widest (fp32 for fp16 beside bf16, which hold different values)."""
    from safetensors import safe_open

    found: set[torch.dtype] = set()
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            names = handle.keys()
            dtypes = {handle.get_slice(name).get_dtype() for name in names}
            found.update(_SAFETENSORS_FLOATS[d] for d in dtypes if d in _SAFETENSORS_FLOATS)
    if len(found) <= 1:
        return next(iter(found), None)
    widest = max(found, key=lambda dtype: dtype.itemsize)
    return widest if widest.itemsize > 2 else torch.float32


def _refuse_pickles(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    if pickles and not any(directory.glob("*.safetensors")):
        raise CheckpointError(
            "E303",
            f"{directory} holds {', '.join(pickles[:3])} but no safetensors: pickled weights can run code and are "
            "not read",
            "convert them to safetensors on a machine you trust (transformers: save_pretrained(safe_serialization="
            "True))",
        )


def open_hf_dir(directory: Path) -> ModelSource:
    """A Hugging Face model directory: the ModelConfig (E005 for what lumina-ds cannot represent exactly), and
    our names mapped onto its tensors (E303 for missing, unexpected or wrongly shaped ones)."""
    from lumina_ds.hf.architectures import model_config_from_hf
    from lumina_ds.hf.weights import hf_to_ours

    hf_config = read_hf_config(directory)
    imported = model_config_from_hf(hf_config)
    _refuse_pickles(directory)
    files = SafetensorsFiles(weights_files(directory))
    names, read = hf_to_ours(imported.model, imported.arch, files.names(), files.get, hf_shapes=files.shapes())
    tokenizer = directory / TOKENIZER_FILE
    return ModelSource(
        path=directory,
        kind="hf",
        model=imported.model,
        names=names,
        read=read,
        tokenizer_file=tokenizer if tokenizer.is_file() else None,
        arch=imported.arch,
        token_ids=dict(imported.token_ids),
        warning=remote_code_warning(directory, hf_config, imported.arch),
    )


def remote_code_warning(directory: Path, hf_config: Mapping[str, Any], arch: str) -> str | None:
    """The warning for a config.json whose `auto_map` names the authors' own code (what `trust_remote_code=True`
    runs), or None without one: lumina-ds runs none of it and builds its own `arch` in its place, and neither the
    import nor export's check (transformers' standard class) compares the two."""
    auto_map = hf_config.get("auto_map")
    if not auto_map:
        return None
    entries = auto_map.items() if isinstance(auto_map, Mapping) else [("auto_map", auto_map)]
    named = ", ".join(f"{key}: {_code_refs(value)}" for key, value in entries)
    chosen = "architectures" if hf_config.get("architectures") else "model_type"
    return (
        f"warning: {directory / HF_CONFIG_FILE} has auto_map ({named}); that remote code was not run: lumina-ds uses "
        f"its own {arch} (config.json's {chosen}), so a model whose remote code differs from the standard {arch} may "
        "not match it, and no lumina-ds check compares logits with that code"
    )


def _code_refs(value: Any) -> str:
    """An auto_map value: "module.Class", or a list of them (AutoTokenizer's slow and fast, either null)."""
    if isinstance(value, list | tuple):
        return " / ".join(str(ref) for ref in value if ref is not None)
    return str(value)


def open_run_source(path: Path) -> ModelSource:
    """A lumina-ds run dir, checkpoints dir or tag: the newest complete tag's consolidated weights."""
    from lumina_ds.config.io import load_config

    checkpoints, tag = resolve_checkpoint(path)
    run_dir = run_dir_of(checkpoints)
    if not (run_dir / CONFIG_FILE).is_file():
        raise CheckpointError("E303", f"{run_dir} has no {CONFIG_FILE}", "point at a lumina-ds run directory or tag")
    paths = weights_files(checkpoints / tag)
    files = SafetensorsFiles(paths)  # E303 for an unreadable header, before stored_dtype reads them
    tokenizer = run_dir / TOKENIZER_FILE
    return ModelSource(
        path=checkpoints / tag,
        kind="lumina",
        model=load_config(run_dir / CONFIG_FILE).model,
        names=files.names(),
        read=files.get,
        tokenizer_file=tokenizer if tokenizer.is_file() else None,
        stored_dtype=stored_dtype(paths),
    )


def open_model_source(path: str | Path) -> ModelSource:
    """A Hugging Face model directory (config.json + safetensors), or a lumina-ds run dir, checkpoints dir or tag."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError("E303", f"{path} does not exist", "pass a run dir, a tag or a Hugging Face model dir")
    if (path / HF_CONFIG_FILE).is_file() and not (path / CONFIG_FILE).is_file():
        return open_hf_dir(path)
    return open_run_source(path)


def check_tokenizer_fits(tokenizer_file: str | Path, model: ModelConfig) -> None:
    """E005 when the tokenizer (with lumina-ds' chat tokens added to a model that has no chat template) has ids past
    the model's embedding: its weights cannot grow to fit."""
    from lumina_ds.tokenizer import ChatTokenizer

    tokenizer = ChatTokenizer.from_file(Path(tokenizer_file).expanduser())
    if tokenizer.vocab_size <= model.vocab_size:
        return
    added = (
        ""
        if tokenizer.chat_template is not None
        else " (it has no chat template, so lumina-ds' 6 chat tokens were added)"
    )
    raise ConfigError(
        "E005",
        f"{tokenizer_file} has {tokenizer.vocab_size:,} ids{added}, past the model's {model.vocab_size:,} embeddings",
        "put the model's chat template beside tokenizer.json as chat_template.jinja (e.g. an instruct sibling's), "
        "or pass a --tokenizer whose ids fit",
    )
