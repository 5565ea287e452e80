"""`--auto-batch-size`: the largest micro-batch whose predicted per-GPU memory fits `--target-memory-usage` of the
device, with the gradient accumulation grown to keep the global batch (the out-of-memory backoff guards the pick)."""

from __future__ import annotations

from dataclasses import dataclass

from lumina_ds.config.run import RunConfig
from lumina_ds.planning.memory import estimate_memory
from lumina_ds.planning.memory_inputs import GIB, Layout, with_bucket_rules


@dataclass(frozen=True)
class BatchPick:
    micro_batch_size: int
    grad_accum: int
    predicted_bytes: float
    fits: bool  # False: not even micro-batch 1 fits the target (it is used anyway, and says so)

    def describe(self, device_bytes: float, target: float) -> str:
        verdict = "fits" if self.fits else "does NOT fit"
        return (f"--auto-batch-size: micro-batch {self.micro_batch_size} x accumulation {self.grad_accum}, predicted "
                f"{self.predicted_bytes / GIB:.1f} GiB per GPU, {verdict} {target:.0%} of "
                f"{device_bytes / GIB:.1f} GiB")  # fmt: skip


def layout_of(run: RunConfig, *, micro_batch_size: int, world_size: int, ranks_per_node: int, precision: str) -> Layout:
    """The memory model's view of this run at `micro_batch_size`."""
    dist = run.distributed
    layout = Layout(zero_stage=dist.zero_stage, gpus=world_size, gpus_per_node=max(1, min(ranks_per_node, world_size)),
                    expert_parallel_size=dist.expert_parallel_size, micro_batch_size=micro_batch_size,
                    seq_len=run.seq_len, recompute=run.train.recompute,
                    precision=precision, offload_optimizer=dist.offload != "none",
                    offload_param=dist.offload == "optimizer+params",
                    grad_accum=run.train.micro_batch_size * run.train.grad_accum // micro_batch_size)  # fmt: skip
    return with_bucket_rules(layout, run.model)


def pick_micro_batch(run: RunConfig, *, device_bytes: float, target: float, world_size: int, ranks_per_node: int,
                     precision: str) -> BatchPick:  # fmt: skip
    """Among the divisors of the run's rows per rank and step (micro x accumulation), the largest that fits."""
    rows = run.train.micro_batch_size * run.train.grad_accum
    pick = None
    for micro in sorted((d for d in range(1, rows + 1) if rows % d == 0), reverse=True):
        layout = layout_of(run, micro_batch_size=micro, world_size=world_size, ranks_per_node=ranks_per_node,
                           precision=precision)  # fmt: skip
        predicted = estimate_memory(run.model, layout).gpu_total
        pick = BatchPick(micro, rows // micro, predicted, predicted <= target * device_bytes)
        if pick.fits:
            return pick
    assert pick is not None
    return pick
