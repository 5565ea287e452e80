"""The model a path names, for planning: `--model PATH` of `plan`, `analyze-memory`, `dry-run`, `estimate-time`,
`ds-config` and `estimate-parameters`.

Only config files are read (a Hugging Face config.json, a run's config.yaml, a YAML run config): no weights, nothing
downloaded, so a directory holding just the published config.json is enough; the planner then builds the model on the
meta device, as for a preset. A Hugging Face model or a lumina-ds run (or tag) is planned as the fine-tuning run
`train --init-from PATH` starts: that model, with the training settings `train` has without --preset (the batch the
planner splits into micro-batch x accumulation). A YAML run config is planned with its own settings, and with the
model of its `init_from` when it names one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lumina_ds.config.io import load_config
from lumina_ds.config.presets import DEFAULT_PRESET, get_preset
from lumina_ds.config.run import RunConfig
from lumina_ds.errors import ConfigError
from lumina_ds.hf.architectures import model_config_from_hf
from lumina_ds.models.config import ModelConfig
from lumina_ds.run_dir import CHECKPOINTS_DIR, CONFIG_FILE, TAG_PATTERN

HF_CONFIG_FILE = "config.json"
YAML_SUFFIXES = (".yaml", ".yml")
WHAT_PLANS = (
    "a Hugging Face model directory or its config.json (Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE, Llama, Mistral, Qwen2, "
    "Qwen3), a lumina-ds run directory, its checkpoints/ or a tag (step_N), or a YAML run config; "
    "examples/published_configs/ holds eight published config.json files"
)


def not_a_model(path: Path, why: str) -> ConfigError:
    return ConfigError("E004", f"--model {path}: {why}", f"pass {WHAT_PLANS}")


def read_json_config(path: Path) -> dict[str, Any]:
    """A config.json as a dict (E004 when it cannot be read or is not a JSON object)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise not_a_model(path, f"cannot read it as JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise not_a_model(path, f"is a JSON {type(config).__name__}, not a Hugging Face config object")
    return config


def run_dir_of(path: Path) -> Path | None:
    """The lumina-ds run directory of a run dir, its checkpoints/ or one of its tags (complete or not: only the
    config.yaml is read), or None."""
    candidates = [path]
    if path.name == CHECKPOINTS_DIR:
        candidates.append(path.parent)
    if TAG_PATTERN.match(path.name) and path.parent.name == CHECKPOINTS_DIR:
        candidates.append(path.parent.parent)
    return next((c for c in candidates if (c / CONFIG_FILE).is_file()), None)


def model_of_path(path: str | Path) -> ModelConfig:
    """The model of a Hugging Face directory or config.json, or of a lumina-ds run dir, checkpoints dir or tag: the
    ModelConfig `train --init-from` takes from it (lumina_ds.hf.source reads the same files), E004/E005 else."""
    path = Path(path).expanduser()
    if not path.exists():
        raise not_a_model(path, "does not exist")
    if path.is_file() and path.name.endswith(".json"):
        return model_config_from_hf(read_json_config(path)).model
    run_dir = run_dir_of(path) if path.is_dir() else None
    if run_dir is not None:
        return load_config(run_dir / CONFIG_FILE).model
    if path.is_dir() and (path / HF_CONFIG_FILE).is_file():
        return model_config_from_hf(read_json_config(path / HF_CONFIG_FILE)).model
    what = "a directory" if path.is_dir() else "a file"
    raise not_a_model(path, f"is {what} with neither a config.json nor a lumina-ds {CONFIG_FILE}")


def run_for_model(path: str | Path) -> RunConfig:
    """The run a path is planned as (see the module's docstring); its `preset` field names the path, for the
    planner's messages: the run is planned, never trained."""
    given = Path(path).expanduser()
    if given.suffix in YAML_SUFFIXES:
        if not given.is_file():
            raise not_a_model(given, "does not exist" if not given.exists() else "is not a file")
        run = load_config(given)
        if run.checkpoint.init_from:  # train --config-file takes the model from it, as --init-from does
            run.model = model_of_path(run.checkpoint.init_from)
    else:
        run = get_preset(DEFAULT_PRESET)
        run.model = model_of_path(given)
    run.preset = str(path)
    run.model_source = str(given)
    return run
