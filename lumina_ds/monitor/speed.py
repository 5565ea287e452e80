"""Achieved speed per device: tokens/s, TFLOP/s and model FLOPs utilisation (MFU) in every log record."""

from __future__ import annotations

from typing import Any

from lumina_ds.monitor.callbacks import Callback


def achieved_tflops(*, flops_per_token: float, tokens_per_s: float) -> float:
    """TFLOP/s from a model's training FLOPs per token (fwd + bwd) and its token rate, as benchmarks/throughput.py."""
    return flops_per_token * tokens_per_s / 1e12


class Throughput(Callback):
    """Adds `tokens_per_s_per_device`, `tflops` (per device) and `mfu` (0..1, None without a known peak) to records
    that carry `tokens_per_s` (all ranks' tokens over the training steps' wall time).

    flops_per_token: `count_parameters(model, seq_len).flops_per_token` (active parameters plus attention), the count
    benchmarks/throughput.py uses. peak_tflops: the device's dense peak, None where unknown (a CPU). Give it before
    the loggers: it edits the record.
    """

    def __init__(self, *, flops_per_token: float, world_size: int, peak_tflops: float | None) -> None:
        assert world_size >= 1 and flops_per_token > 0
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak_tflops = peak_tflops

    def on_log(self, metrics: dict[str, Any]) -> None:
        if "tokens_per_s" not in metrics:
            return
        per_device = metrics["tokens_per_s"] / self.world_size
        tflops = achieved_tflops(flops_per_token=self.flops_per_token, tokens_per_s=per_device)
        metrics.update(
            tokens_per_s_per_device=per_device,
            tflops=tflops,
            mfu=tflops / self.peak_tflops if self.peak_tflops else None,
        )
