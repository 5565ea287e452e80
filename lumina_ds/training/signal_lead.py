"""How long before the kill a scheduler's stop signal must come for the run to finish its step and save: measured on
the run (its slowest step after the first, and its first save), printed once after that save, and checked against
the lead the job asked for (`LUMINA_SIGNAL_LEAD`, which launch/slurm/train.sbatch sets from its `--signal`)."""

from __future__ import annotations

import math
import os

from lumina_ds.config.run import SIGNAL_MARGIN_S as MARGIN_S

SIGNAL_LEAD_ENV = "LUMINA_SIGNAL_LEAD"  # seconds between the scheduler's warning signal and its kill


class SignalLead:
    """The slowest step seen (the first, which pays for warm-up, is left out once there are others)."""

    def __init__(self) -> None:
        self._first: float | None = None
        self._slowest_after_first = 0.0

    def step_done(self, seconds: float) -> None:
        if self._first is None:
            self._first = seconds
        else:
            self._slowest_after_first = max(self._slowest_after_first, seconds)

    @property
    def step_seconds(self) -> float:
        return self._slowest_after_first or (self._first or 0.0)

    def needed(self, save_s: float) -> int:
        """A signal arriving just after a step began waits for that step, then the save, then the margin."""
        return math.ceil(self.step_seconds + save_s + MARGIN_S)

    def advice(self, *, save_s: float) -> str:
        need = self.needed(save_s)
        parts = f"a step {self.step_seconds:.1f}s + the save {save_s:.1f}s + {MARGIN_S:.0f}s"
        given = _given_lead()
        if given is not None and given < need:
            return (f"warning: the stop signal comes {given:.0f}s before the kill ({SIGNAL_LEAD_ENV}), but this run "
                    f"needs {need}s to stop with a checkpoint ({parts}): set #SBATCH --signal=USR1@{need} (or more) "
                    "in the batch script, or save more often with --save-every-minutes")  # fmt: skip
        return (f"checkpoint saved in {save_s:.1f}s: a stop signal must come at least {need}s before the kill "
                f"({parts}); with SLURM: #SBATCH --signal=USR1@{need}")  # fmt: skip


def _given_lead() -> float | None:
    text = os.environ.get(SIGNAL_LEAD_ENV, "").strip()
    try:
        return float(text) if text else None
    except ValueError:
        return None
