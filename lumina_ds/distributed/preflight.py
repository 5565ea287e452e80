"""Pre-flight: the rules that depend on the number of processes (E203). Rules on the config alone are
RunConfig.validate's (E002); what the hardware can run is select_precision's and the attention backend's (E003)."""

from __future__ import annotations

from lumina_ds.config.run import RunConfig
from lumina_ds.errors import MemoryPlanError


def preflight(run: RunConfig, world_size: int) -> None:
    """Raise MemoryPlanError E203 when `run` cannot be laid out on `world_size` processes."""
    if world_size < 1:
        raise MemoryPlanError("E203", f"world size {world_size} must be >= 1", "launch at least one process")
    ep, experts = run.distributed.expert_parallel_size, run.model.moe.num_experts
    if world_size % ep:
        sizes = [d for d in range(1, world_size + 1) if world_size % d == 0 and (experts or 1) % d == 0]
        raise MemoryPlanError(
            "E203",
            f"{world_size} processes cannot be split into data-parallel x expert-parallel groups of {ep}",
            f"processes = DP x EP: use --expert-parallel-size in {sizes}, or launch a multiple of {ep} processes",
        )
