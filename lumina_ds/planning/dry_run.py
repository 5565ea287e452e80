"""Everything up to the first step without allocating: model on the meta device, counts, FLOPs, pre-flight, plan,
the DeepSpeed config and DeepSpeed's own parse of it."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from lumina_ds.config.run import RunConfig
from lumina_ds.distributed.parallelize import parallelize, uses_autoep
from lumina_ds.distributed.preflight import preflight
from lumina_ds.models.counting import ParameterCount, count_parameters
from lumina_ds.models.transformer import meta_transformer
from lumina_ds.planning.layouts import METADATA_KEY, ds_config_for_plan, planned_run
from lumina_ds.planning.plan_report import format_plan, plan_as_dict
from lumina_ds.planning.planner import Cluster, Plan, plan


@dataclass
class DryRun:
    plan: Plan
    counts: ParameterCount
    attention_flops_per_token: float
    ds_config: dict[str, Any]
    model_summary: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "plan": plan_as_dict(self.plan),
            "parameters": self.counts.as_dict(),
            "attention_flops_per_token": self.attention_flops_per_token,
            "model": self.model_summary,
            "deepspeed_config": self.ds_config,
        }


def deepspeed_parses(config: dict[str, Any]) -> None:
    """DeepSpeed's own config parser (pydantic sections, sanity checks) on the file, outside any process group.

    Without a process group DeepSpeed sees one rank, so the batch keys are checked here for world size 1 (the
    planner already made train_batch_size = micro x accum x GPUs).
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    single = {k: v for k, v in copy.deepcopy(config).items() if k != METADATA_KEY}
    single["train_batch_size"] = single["train_micro_batch_size_per_gpu"] * single["gradient_accumulation_steps"]
    DeepSpeedConfig(single)


def meta_model_summary(run: RunConfig) -> str:
    """Build the planned model on the meta device and apply the same parallelisation training applies."""
    model = meta_transformer(run.model)
    with torch.device("meta"):
        sections = parallelize(model, run, rank=0)
    ep = run.distributed.expert_parallel_size
    parts = [f"{sum(1 for _ in model.modules())} modules on the meta device", f"{model.num_moe_layers} MoE layers"]
    if uses_autoep(run) and "expert_parallel" in sections:
        parts.append(
            f"AutoEP replaces them at initialize: {run.model.moe.num_experts // ep} experts per rank (EP {ep})"
        )
    parts.append(f"activation recompute {model.recompute}")
    return ", ".join(parts)


def dry_run(
    run: RunConfig, cluster: Cluster, *, seq_len: int | None = None, precision: str = "auto", mfu: float = 0.4
) -> DryRun:
    """Plan `run` for `cluster` and go through every step before training that needs no memory."""
    result = plan(run, cluster, seq_len=seq_len, precision=precision, mfu=mfu)
    planned = planned_run(run, result)
    planned.validate()
    preflight(planned, cluster.gpus)
    counts = count_parameters(planned.model, seq_len=result.seq_len)
    model = planned.model
    attention = 12.0 * model.num_layers * model.hidden_size * result.seq_len
    config = ds_config_for_plan(run, result)
    deepspeed_parses(config)
    return DryRun(result, counts, attention, config, meta_model_summary(planned))


def format_dry_run(dry: DryRun) -> str:
    counts = dry.counts
    lines = [f"{dry.plan.preset}: {counts.total:,} parameters ({counts.total / 1e9:.2f}B), "
             f"{counts.active:,} active per token"]  # fmt: skip
    for name, n in counts.by_component.items():
        if n:
            lines.append(f"  {name:<15} {n:>18,}  {100 * n / counts.total:5.1f}%")
    dense = counts.flops_per_token - dry.attention_flops_per_token
    lines.append(
        f"training FLOPs/token {counts.flops_per_token:.3e} = 6*N_active {dense:.3e} + attention "
        f"{dry.attention_flops_per_token:.3e} (seq {dry.plan.seq_len})"
    )
    lines += [f"model: {dry.model_summary}", "pre-flight: ok", "DeepSpeed config: parsed by DeepSpeed", ""]
    lines.append(format_plan(dry.plan))
    return "\n".join(lines)
