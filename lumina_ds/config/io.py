"""RunConfig <-> plain dicts and YAML files, strict about unknown keys."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lumina_ds.config.run import RunConfig
from lumina_ds.errors import ConfigError

T = TypeVar("T")


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError("E002", f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError("E002", f"unknown key(s) {unknown} in {where or 'config'}", f"valid keys: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        key = f"{where}.{name}".lstrip(".")
        if dataclasses.is_dataclass(default):
            kwargs[name] = _from_dict(type(default), value, key)
        else:
            kwargs[name] = _coerce(key, default, value)
    return cls(**kwargs)


def _coerce(key: str, default: Any, value: Any) -> Any:
    """Check a scalar against its field's default type; YAML reads `1e-4` as a string, so floats are parsed."""
    if value is None or default is None:
        return value  # optional fields
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float) and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            ok = False
    else:
        ok = isinstance(value, type(default))
    return value if ok else _bad(key, default, value)


KIND_NAMES = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}


def _bad(key: str, default: Any, value: Any) -> Any:
    kind = KIND_NAMES.get(type(default).__name__, type(default).__name__)
    raise ConfigError("E002", f"{key} must be {kind}, got {value!r}", f"for example {key.split('.')[-1]}: {default!r}")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`: nested mappings merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = deep_merge(merged[key], value) if both_dicts else value
    return merged


def config_from_fields(data: dict[str, Any]) -> RunConfig:
    """Every field given (as config_to_dict writes them); nothing is filled in from a preset."""
    return _from_dict(RunConfig, data, "")


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """A `preset:` key makes that preset the base the other keys override; without one, the dataclass defaults."""
    if isinstance(data, dict) and "preset" in data:
        from lumina_ds.config.presets import get_preset

        data = deep_merge(config_to_dict(get_preset(str(data["preset"]))), data)
    return _from_dict(RunConfig, data, "")


def save_config(config: RunConfig, path: str | Path) -> None:
    """Written to a temporary name and renamed: a reader (chat, export, a resume) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    os.replace(tmp, path)


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError("E104", f"config file {path} does not exist", "check the path given to --config-file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError("E002", f"config file {path} is not valid YAML: {exc}") from exc
    return config_from_dict(data or {})
