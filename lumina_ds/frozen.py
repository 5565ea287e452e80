"""Configs that can be frozen: once a run's config is resolved nothing sets a field of it in place; a later change is
a new config (lumina_ds.config.changes.revise), validated and logged."""

from __future__ import annotations

import dataclasses
from typing import Any

FROZEN_FLAG = "_frozen"


class FrozenConfigError(AttributeError):
    """A field of a resolved (frozen) config was set in place: an internal error, never a user's."""


class Freezable:
    """Mixin for the config dataclasses: `freeze()` makes this config and every config inside it read-only."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get(FROZEN_FLAG, False):
            raise FrozenConfigError(
                f"{type(self).__name__}.{name} set on a resolved config: use lumina_ds.config.changes.revise"
            )
        object.__setattr__(self, name, value)

    @property
    def frozen(self) -> bool:
        return bool(self.__dict__.get(FROZEN_FLAG, False))

    def freeze(self) -> None:
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if isinstance(value, Freezable):
                value.freeze()
        object.__setattr__(self, FROZEN_FLAG, True)
