"""What every part of the Hugging Face boundary shares: the E005 refusal and a config.json reader with defaults."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lumina_ds.errors import ConfigError


def staging_dir(output: Path, suffix: str) -> Path:
    """`<output><suffix>`, empty, for a directory built in full before it is renamed to `output` (E002 when `output`
    already holds something: an import or export never writes over files)."""
    if output.exists() and any(output.iterdir()):
        raise ConfigError("E002", f"{output} already exists and is not empty", "pass a new --output directory")
    staging = output.with_name(output.name + suffix)
    shutil.rmtree(staging, ignore_errors=True)  # what an interrupted run left
    staging.mkdir(parents=True)
    return staging


def refuse(arch: str, what: str, hint: str = "") -> ConfigError:
    """E005: something lumina-ds cannot represent exactly; never approximated."""
    return ConfigError("E005", f"{arch}: {what}", hint)


class HFConfigReader:
    """Reads a config.json as its transformers class does: a key left out takes the class default, an explicit
    null stays null (`sliding_window: null` is no window even where the default is 4096)."""

    def __init__(self, hf: Mapping[str, Any], *, arch: str, defaults: Mapping[str, Any]) -> None:
        self.hf = hf
        self.arch = arch
        self.defaults = defaults

    def __call__(self, key: str, *aliases: str) -> Any:
        """The value of `key` (or of an alias transformers' attribute_map makes the same attribute)."""
        stated = {name: self.hf[name] for name in (key, *aliases) if name in self.hf}
        if len({repr(value) for value in stated.values()}) > 1:
            raise refuse(self.arch, f"config.json states {stated}, which transformers reads as one attribute")
        if stated:
            return next(iter(stated.values()))
        if key not in self.defaults:
            raise refuse(self.arch, f"config.json does not state {key!r}")
        return self.defaults[key]

    def require(self, key: str, allowed: tuple[Any, ...], hint: str = "") -> None:
        """Refuse a value of an option that changes the function when it is not one of `allowed`."""
        value = self.hf.get(key, self.defaults.get(key))
        if value not in allowed:
            raise refuse(self.arch, f"{key}={value!r} is not supported (supported: {list(allowed)})", hint)
