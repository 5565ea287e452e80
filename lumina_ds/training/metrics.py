"""Step metrics summed over a logging window on the device, then reduced across data-parallel ranks.

The window knows nothing of what the model reports: floating-point tensors of the model's `metrics` dict (losses,
per-layer means) are averaged element-wise over micro-batches and ranks, integer ones (counters such as tokens per
expert) are summed.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from lumina_ds.distributed.collectives import all_reduce_sum
from lumina_ds.models.transformer import ModelOutput

MAX_EXP_ARGUMENT = 700.0  # math.exp overflows a float above ~709.8: a perplexity past this is shown as inf


def perplexity(lm_loss: float) -> float:
    """exp of the mean token cross-entropy; inf once that overflows (a diverged run shows PPL inf, not a cap)."""
    return math.exp(lm_loss) if lm_loss < MAX_EXP_ARGUMENT else math.inf


def memory_summary() -> str:
    if torch.cuda.is_available():
        used = torch.cuda.max_memory_allocated() / 2**30
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
        return f"GPU {used:.1f}/{total:.1f}GB ({100 * used / total:.0f}%)"
    import psutil

    return f"CPU RSS {psutil.Process(os.getpid()).memory_info().rss / 2**30:.2f}GB"


class WindowMetrics:
    """Sums of per-micro-batch values since the last log line, kept on the device.

    Nothing here reads a value back to the host per micro-batch: on a GPU that would stall the queue between forward
    and backward. The host sees the sums once per log line (`summary`) or when asked (`all_finite`).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.micro_batches = 0
        self.tokens = 0
        self.seconds = 0.0  # wall time of the training steps in the window
        self.means: dict[str, torch.Tensor] = {}  # loss, lm_loss and the model's floating-point metrics, summed
        self.counters: dict[str, torch.Tensor] = {}  # the model's integer metrics, summed

    def add(self, out: ModelOutput, tokens: int) -> None:
        self.micro_batches += 1
        self.tokens += tokens
        values = {"loss": out["loss"], "lm_loss": out["lm_loss"], **out.get("metrics", {})}
        for name, value in values.items():
            value = value.detach()
            mean = value.is_floating_point()
            sums = self.means if mean else self.counters
            value = value.float() if mean else value.long()
            sums[name] = value if name not in sums else sums[name] + value

    def all_finite(self) -> bool:
        """Whether every loss in the window was finite (NaN and inf survive summation)."""
        return all(bool(torch.isfinite(v).all()) for v in self.means.values())

    def summary(self) -> dict[str, Any]:
        """Means over micro-batches and ranks; counters summed over both (collective: every rank calls it).

        0-d means come back as floats, per-layer ones as lists."""
        names = sorted(self.means)  # every rank's model reports the same names and shapes
        flat = [self.means[n].double().cpu().reshape(-1) for n in names]
        local = torch.cat([*flat, torch.tensor([self.micro_batches, self.tokens], dtype=torch.float64)])
        *sums, micro_batches, tokens = all_reduce_sum(local).tolist()
        out: dict[str, Any] = {}
        for name, part in zip(names, flat, strict=True):
            values = [total / max(micro_batches, 1) for total in sums[: part.numel()]]
            sums = sums[part.numel() :]
            out[name] = values if self.means[name].ndim else values[0]
        out["ppl"] = perplexity(out.get("lm_loss", 0.0))
        out["tokens"] = int(tokens)
        for name in sorted(self.counters):
            out[name] = all_reduce_sum(self.counters[name].cpu()).tolist()
        return out
