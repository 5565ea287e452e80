"""Pre-flight checks (E203) for layouts that DeepSpeed would otherwise reject only at runtime, or deep inside."""

from __future__ import annotations

from typing import Any

from lumina_ds.config.run import RunConfig
from lumina_ds.distributed.ds_config import load_override
from lumina_ds.errors import MemoryPlanError

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def layout_error(message: str, hint: str) -> MemoryPlanError:
    return MemoryPlanError("E203", message, hint)


def check_expert_layout(run: RunConfig, world_size: int) -> None:
    """GPUs = DP x EP, EP divides the experts, EP needs a MoE model; native MoE has no ZeRO-3."""
    dist, moe = run.distributed, run.model.moe
    ep = dist.expert_parallel_size
    if ep > 1 and not moe.enabled:
        raise layout_error(f"expert_parallel_size={ep} needs a MoE model", "use --expert-parallel-size 1")
    if world_size % ep:
        sizes = [d for d in range(1, world_size + 1) if world_size % d == 0 and moe.num_experts % d == 0]
        raise layout_error(
            f"{world_size} GPUs cannot be split into data-parallel x expert-parallel groups of {ep}",
            f"GPUs = DP x EP: use --expert-parallel-size in {sizes}",
        )
    if moe.enabled and moe.num_experts % ep:
        raise layout_error(
            f"num_experts={moe.num_experts} is not divisible by expert_parallel_size={ep}",
            "each expert-parallel rank holds num_experts / EP experts",
        )
    if moe.enabled and dist.moe_backend == "native" and dist.zero_stage == 3:
        raise layout_error(
            "the native DeepSpeed MoE layer is refused at ZeRO stage 3",
            "use --moe-backend autoep (AutoEP works at ZeRO 1-3) or --zero-stage 2",
        )


def check_precision_layout(run: RunConfig, precision: str) -> None:
    if precision == "bf16" and run.distributed.zero_stage == 0:
        raise layout_error(
            "pure bf16 (bf16 master weights and optimizer states) needs ZeRO stage 1, 2 or 3",
            "use --zero-stage 1 or higher, or --precision mixed_bf16",
        )


def check_batch_override(override: dict[str, Any], *, world_size: int) -> None:
    """train_batch_size = micro-batch x accumulation x GPUs, as DeepSpeed asserts at initialize."""
    tbs, micro, accum = (override.get(k) for k in BATCH_KEYS)
    if tbs is not None and micro is not None and accum is not None and tbs != micro * accum * world_size:
        raise layout_error(
            f"--deepspeed-config sets train_batch_size={tbs}, but micro-batch {micro} x accumulation {accum} x "
            f"{world_size} GPUs = {micro * accum * world_size}",
            "drop train_batch_size from the file (lumina-ds computes it) or make the three agree",
        )


def check_universal_checkpoint(run: RunConfig, override: dict[str, Any]) -> None:
    """Universal checkpoints cannot hold native-MoE experts (DeepSpeed fails to reshape them on load)."""
    universal = bool(override.get("checkpoint", {}).get("load_universal"))
    if universal and run.model.moe.enabled and run.distributed.moe_backend == "native":
        raise layout_error(
            "a universal checkpoint cannot be loaded into the native DeepSpeed MoE layer",
            "train and resume with --moe-backend autoep, or resume at the same world size without load_universal",
        )


def preflight(run: RunConfig, world_size: int, *, precision: str | None = None) -> None:
    """Every layout rule a run must satisfy on `world_size` processes; raises MemoryPlanError E203."""
    if world_size < 1:
        raise layout_error(f"world size {world_size} must be >= 1", "launch at least one process")
    check_expert_layout(run, world_size)
    check_precision_layout(run, precision or run.train.precision)
    if run.distributed.deepspeed_config:
        override = load_override(run.distributed.deepspeed_config)
        check_batch_override(override, world_size=world_size)
        check_universal_checkpoint(run, override)
