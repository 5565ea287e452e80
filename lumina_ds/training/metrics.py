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


def memory_summary() -> str:
    if torch.cuda.is_available():
        used = torch.cuda.max_memory_allocated() / 2**30
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
        return f"GPU {used:.1f}/{total:.1f}GB ({100 * used / total:.0f}%)"
    import psutil

    return f"CPU RSS {psutil.Process(os.getpid()).memory_info().rss / 2**30:.2f}GB"


class WindowMetrics:
    """Sums of per-micro-batch values since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.micro_batches = 0
        self.loss = 0.0
        self.lm_loss = 0.0
        self.aux = 0.0
        self.z = 0.0
        self.tokens = 0
        self.seconds = 0.0  # wall time of the training steps in the window
        self.counts: torch.Tensor | None = None  # [num_moe_layers, E]

    def add(self, out: dict[str, torch.Tensor], tokens: int) -> None:
        self.micro_batches += 1
        self.loss += float(out["loss"].detach())
        self.lm_loss += float(out["lm_loss"].detach())
        self.aux += float(out["aux_loss"].detach())
        self.z += float(out["z_loss"].detach())
        self.tokens += tokens
        counts = out["expert_counts"]
        if counts.ndim == 2:
            counts = counts.detach().cpu().long()
            self.counts = counts if self.counts is None else self.counts + counts

    def summary(self) -> dict[str, Any]:
        """Means over micro-batches and ranks; expert counts summed over both."""
        local = torch.tensor(
            [self.loss, self.lm_loss, self.aux, self.z, self.micro_batches, self.tokens], dtype=torch.float64
        )
        loss, lm_loss, aux, z, n, tokens = all_reduce_sum(local).tolist()
        out: dict[str, Any] = {
            "loss": loss / n,
            "lm_loss": lm_loss / n,
            "ppl": math.exp(min(lm_loss / n, 50.0)),
            "aux_loss": aux / n,
            "z_loss": z / n,
            "tokens": int(tokens),
        }
        out.update(moe_balance(all_reduce_sum(self.counts) if self.counts is not None else None))
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
