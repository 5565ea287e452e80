"""Faults injected into a training run by the tests and the fault drill, never by a user flag.

`LUMINA_FAULTS="nan_loss@5,spike_loss@7+,oom@3:1,crash@4"`: a kind, `@` the optimizer step it hits (numbered as the
trainer numbers them, from 1), `+` for that step and every later one (else once per process, so a rewound or backed-off
run gets past it), `:r` for rank r only (else every rank).

- `nan_loss`, `spike_loss`: the step's first micro-batch loss is multiplied by NaN or by 1000 before backward, so its
  gradients are poisoned too;
- `oom`: `torch.OutOfMemoryError` in that step's first forward;
- `oom_init`: `torch.OutOfMemoryError` while the model and the DeepSpeed engine are built (`oom_init@0`);
- `crash`: a RuntimeError after that step completed (between steps, where an emergency checkpoint is consistent).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

ENV_VAR = "LUMINA_FAULTS"
KINDS = ("nan_loss", "spike_loss", "oom", "oom_init", "crash")
SPIKE = 1000.0
_SPEC = re.compile(r"^(?P<kind>[a-z_]+)@(?P<step>\d+)(?P<repeat>\+?)(?::(?P<rank>\d+))?$")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    repeat: bool = False  # this step and every later one
    rank: int | None = None  # None: every rank

    def hits(self, step: int, rank: int) -> bool:
        on_step = step >= self.step if self.repeat else step == self.step
        return on_step and self.rank in (None, rank)


def parse_faults(text: str) -> list[Fault]:
    faults = []
    for spec in filter(None, (part.strip() for part in text.split(","))):
        match = _SPEC.match(spec)
        if match is None or match["kind"] not in KINDS:
            raise ValueError(f"{ENV_VAR}: cannot read {spec!r}; write kind@step[+][:rank] with kind in {KINDS}")
        rank = int(match["rank"]) if match["rank"] is not None else None
        faults.append(Fault(match["kind"], int(match["step"]), bool(match["repeat"]), rank))
    return faults


class FaultPlan:
    """The faults of this process; each one-shot fault fires once."""

    def __init__(self, faults: list[Fault], *, rank: int) -> None:
        self.faults, self.rank = list(faults), rank
        self._fired: set[Fault] = set()

    @classmethod
    def from_env(cls, *, rank: int) -> FaultPlan:
        """The plan LUMINA_FAULTS names, for one run (kept across its engine rebuilds: a one-shot fault stays spent)."""
        return cls(parse_faults(os.environ.get(ENV_VAR, "")), rank=rank)

    def _take(self, kind: str, step: int) -> bool:
        for fault in self.faults:
            if fault.kind == kind and fault.hits(step, self.rank) and fault not in self._fired:
                if not fault.repeat:
                    self._fired.add(fault)
                return True
        return False

    def poison(self, loss: torch.Tensor, *, step: int) -> torch.Tensor:
        if self._take("nan_loss", step):
            return loss * float("nan")
        if self._take("spike_loss", step):
            return loss * SPIKE
        return loss

    def before_forward(self, *, step: int) -> None:
        if self._take("oom", step):
            raise torch.OutOfMemoryError(f"injected by {ENV_VAR} at step {step}")

    def building_engine(self) -> None:
        if self._take("oom_init", 0):
            raise torch.OutOfMemoryError(f"injected by {ENV_VAR} while building the engine")

    def after_step(self, *, step: int) -> None:
        if self._take("crash", step):
            raise RuntimeError(f"injected crash after step {step} ({ENV_VAR})")
