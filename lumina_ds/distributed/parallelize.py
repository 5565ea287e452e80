"""Parallelism is applied to a plain model by named functions, in one fixed order (torchtitan style)."""

from __future__ import annotations

from typing import Any

import torch

from lumina_ds.config.run import RunConfig
from lumina_ds.distributed.expert_parallel import apply_native_moe, autoep_section
from lumina_ds.models.transformer import Transformer


def apply_activation_checkpointing(model: Transformer, *, mode: str) -> None:
    """Recompute each block (full) or one sub-block of each (attention, moe) in backward; non-reentrant torch
    checkpoint, which works under ZeRO-3 (the recompute gathers the parameters it uses again)."""
    model.set_recompute(mode)


def apply_compile(model: Transformer) -> None:
    """Regional torch.compile (torchtitan's apply_compile): each block's attention and norms, and dense FFNs; the MoE
    dispatch stays eager (its per-expert counts depend on the routing)."""
    model.compile_blocks()


def uses_autoep(run: RunConfig) -> bool:
    # at ep 1 our own block is the same math without the all-to-all, so AutoEP only replaces it when ep > 1
    return (
        run.model.moe.enabled and run.distributed.moe_backend == "autoep" and run.distributed.expert_parallel_size > 1
    )


def parallelize(model: Transformer, run: RunConfig, *, rank: int) -> dict[str, Any]:
    """Apply expert placement, activation checkpointing and compile; returns DeepSpeed config sections to add."""
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
        sections["expert_parallel"] = autoep_section(model, ep_size=dist.expert_parallel_size,
                                                     cuda=torch.cuda.is_available())  # fmt: skip
    apply_activation_checkpointing(model, mode=run.train.recompute)
    if run.train.compile:  # after expert placement: the native layer is in place; AutoEP only swaps MoE FFNs
        apply_compile(model)
    return sections
