"""The one way a resolved run config changes: `revise` returns a new config with the named fields changed, validated
and frozen, and logs each change with its reason (the tokenizer's vocabulary, an out-of-memory backoff, ...)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lumina_ds.config.io import config_from_fields, config_to_dict
from lumina_ds.config.run import RunConfig
from lumina_ds.errors import ConfigError


def revise(
    run: RunConfig, changes: dict[str, Any], *, reason: str, log: Callable[[str], None] | None = None
) -> RunConfig:
    """`run` with `changes` ({"section.field": value}, e.g. {"model.vocab_size": 2112}), as a new validated, frozen
    config; `log` gets one line per field that really changes. `run` itself is left as it was."""
    data = config_to_dict(run)
    lines = []
    for dotted, value in changes.items():
        *sections, name = dotted.split(".")
        target = data
        for section in sections:
            target = target[section]
        if name not in target:
            raise ConfigError("E002", f"revise: unknown config field {dotted}")
        if target[name] != value:
            lines.append(f"config: {dotted} {target[name]!r} -> {value!r} ({reason})")
        target[name] = value
    revised = config_from_fields(data)
    revised.validate()
    revised.freeze()
    if log is not None:
        for line in lines:
            log(line)
    return revised
