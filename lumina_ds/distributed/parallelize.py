"""Parallelism is applied to a plain model by named functions, in one fixed order (torchtitan style)."""

from __future__ import annotations

from typing import Any

from lumina_ds.config.run import RunConfig
from lumina_ds.distributed.expert_parallel import apply_native_moe, autoep_section
from lumina_ds.models.transformer import Transformer


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block in backward (non-reentrant torch checkpoint: works under ZeRO-3)."""
    model.checkpoint_layers = True


def uses_autoep(run: RunConfig) -> bool:
    # at ep 1 our own block is the same math without the all-to-all, so AutoEP only replaces it when ep > 1
    return (
        run.model.moe.enabled and run.distributed.moe_backend == "autoep" and run.distributed.expert_parallel_size > 1
    )


def parallelize(model: Transformer, run: RunConfig, *, rank: int) -> dict[str, Any]:
    """Apply expert placement and activation checkpointing; returns DeepSpeed config sections to add."""
    dist = run.distributed
    sections: dict[str, Any] = {}
    if run.model.moe.enabled and dist.moe_backend == "native":
        apply_native_moe(
            model,
            ep_size=dist.expert_parallel_size,
            ep_rank=rank % dist.expert_parallel_size,
            deterministic=dist.deterministic_gating,
        )
    elif uses_autoep(run):
        sections["expert_parallel"] = autoep_section(model, ep_size=dist.expert_parallel_size)
    if run.train.gradient_checkpointing:
        apply_activation_checkpointing(model)
    return sections
