"""Project errors: every user mistake carries a code (see README "Error codes") and a hint."""

from __future__ import annotations


class LuminaError(Exception):
    """A user-facing error with a stable code and a hint that says what to change."""

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        self.code = code
        self.message = message
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"[{self.code}] {self.message}"
        return text + (f"\nHint: {self.hint}" if self.hint else "")


class ConfigError(LuminaError):
    """E0xx: invalid preset, incompatible options, hardware that cannot run the config."""


class DataError(LuminaError):
    """E1xx: malformed dataset lines, missing fields, encoding problems."""


class MemoryPlanError(LuminaError):
    """E2xx: the configuration does not fit in GPU, host or optimizer memory."""


class TrainingError(LuminaError):
    """E30x: divergence, gradient overflow."""


class CheckpointError(LuminaError):
    """E303 and friends: missing, corrupt or incompatible checkpoints."""
