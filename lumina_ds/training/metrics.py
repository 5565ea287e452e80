"""Accumulation of step metrics over a logging window, reduced across data-parallel ranks."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.distributed as dist


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (NCCL needs the tensor on the GPU; gloo takes it on the CPU)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        work = values.cuda() if torch.cuda.is_available() else values.clone()
        dist.all_reduce(work)
        return work.cpu()
    return values


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on at least one: ranks that disagree would wait on each other forever."""
    return float(all_reduce_sum(torch.tensor([1.0 if flag else 0.0]))[0]) > 0


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
        self.sums: torch.Tensor | None = None  # [4]: loss, lm_loss, aux_loss, z_loss
        self.counts: torch.Tensor | None = None  # [num_moe_layers, E]

    def add(self, out: dict[str, torch.Tensor], tokens: int) -> None:
        self.micro_batches += 1
        self.tokens += tokens
        values = torch.stack([out[k].detach().float() for k in ("loss", "lm_loss", "aux_loss", "z_loss")])
        self.sums = values if self.sums is None else self.sums + values
        counts = out["expert_counts"]
        if counts.ndim == 2:
            counts = counts.detach().long()
            self.counts = counts if self.counts is None else self.counts + counts

    def all_finite(self) -> bool:
        """Whether every loss in the window was finite (NaN and inf survive summation)."""
        return self.sums is None or bool(torch.isfinite(self.sums).all())

    def summary(self) -> dict[str, Any]:
        """Means over micro-batches and ranks; expert counts summed over both."""
        sums = self.sums.double().cpu().tolist() if self.sums is not None else [0.0] * 4
        local = torch.tensor([*sums, self.micro_batches, self.tokens], dtype=torch.float64)
        loss, lm_loss, aux, z, n, tokens = all_reduce_sum(local).tolist()
        out: dict[str, Any] = {
            "loss": loss / n,
            "lm_loss": lm_loss / n,
            "ppl": math.exp(min(lm_loss / n, 50.0)),
            "aux_loss": aux / n,
            "z_loss": z / n,
            "tokens": int(tokens),
        }
        out.update(moe_balance(all_reduce_sum(self.counts.cpu()) if self.counts is not None else None))
        return out


def moe_balance(counts: torch.Tensor | None) -> dict[str, Any]:
    """Balance = mean over layers of the coefficient of variation of tokens per expert (0 = perfectly even)."""
    if counts is None:
        return {"expert_counts": None, "moe_balance": None, "experts_used": None, "num_experts": 0}
    c = counts.double()
    cv = (c.std(dim=1, unbiased=False) / c.mean(dim=1).clamp_min(1e-9)).mean()
    used = int((counts > 0).sum(dim=1).min())  # the worst layer
    return {
        "expert_counts": counts.tolist(),
        "moe_balance": float(cv),
        "experts_used": used,
        "num_experts": counts.shape[1],
    }
