"""Per-preset DeepSpeed JSON for a reference cluster (`lumina-ds ds-config`, `ds_configs/`), and how a launch on
another number of GPUs adopts one (batch keys recomputed for the real world size)."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lumina_ds.config.run import RunConfig
from lumina_ds.distributed.ds_config import build_ds_config
from lumina_ds.distributed.expert_parallel import autoep_section
from lumina_ds.distributed.memory import GIB, Layout
from lumina_ds.distributed.planner import Cluster, Plan

# The cluster each checked-in ds_configs/<preset>.json is planned for (H100 80 GB, 1 TB host per node).
REFERENCE_CLUSTERS: dict[str, Cluster] = {
    **{name: Cluster(1, 8, 80.0) for name in ("debug", "m70_memory", "m120_speed", "b1", "b3_inference")},
    **{name: Cluster(1, 8, 80.0) for name in ("b6_quality", "b7", "b14")},
    "b50": Cluster(8, 8, 80.0),
    "b100": Cluster(16, 8, 80.0),
    "b200": Cluster(32, 8, 80.0),
    "b300": Cluster(32, 8, 80.0),
}
METADATA_KEY = "lumina_ds"  # our section: DeepSpeed ignores it, launch/train.py reads and strips it
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
PRECISION_KEYS = ("bf16", "fp16")
# keys build_ds_config derives from the RunConfig: the run's own flags decide them, not the file
GENERATED_KEYS = (
    "seed",
    "gradient_clipping",
    "steps_per_print",
    "wall_clock_breakdown",
    "zero_allow_untested_optimizer",
)


def planned_run(run: RunConfig, plan: Plan) -> RunConfig:
    """A copy of `run` with the plan's ZeRO stage, EP size, batch split, recompute and sequence length."""
    best = plan.best
    planned = copy.deepcopy(run)
    planned.distributed = replace(
        run.distributed, zero_stage=best.layout.zero_stage, expert_parallel_size=best.layout.expert_parallel_size
    )
    planned.train = replace(
        run.train,
        micro_batch_size=best.layout.micro_batch_size,
        grad_accum=best.grad_accum,
        gradient_checkpointing=best.layout.gradient_checkpointing,
    )
    planned.data = replace(run.data, seq_len=plan.seq_len)
    return planned


def zero_section(layout: Layout) -> dict[str, Any]:
    """Bucket sizes and offload exactly as the memory model assumed them."""
    if layout.zero_stage == 0:
        return {"stage": 0}
    section: dict[str, Any] = {
        "stage": layout.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": layout.overlap,
        "reduce_bucket_size": layout.reduce_bucket_size,
    }
    if layout.zero_stage == 3:
        section.update(
            stage3_prefetch_bucket_size=layout.prefetch_bucket_size,
            stage3_param_persistence_threshold=layout.persistence_threshold,
            sub_group_size=layout.sub_group_size,
        )
    if layout.offload_optimizer:
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if layout.offload_param:
        section["offload_param"] = {"device": "cpu", "pin_memory": True}
    return section


def ds_config_for_plan(run: RunConfig, plan: Plan) -> dict[str, Any]:
    """The complete DeepSpeed JSON of a plan, with a `lumina_ds` section recording where it came from."""
    planned = planned_run(run, plan)
    best, cluster = plan.best, plan.cluster
    config = build_ds_config(planned, world_size=cluster.gpus, precision=plan.precision)
    config["zero_optimization"] = zero_section(best.layout)
    if best.layout.offload_optimizer:
        config["zero_force_ds_cpu_optimizer"] = False  # our client torch AdamW runs on the host
    if best.layout.expert_parallel_size > 1 and planned.distributed.moe_backend == "autoep":
        with torch.device("meta"):
            model = planned.model.build()
        config["expert_parallel"] = autoep_section(model, ep_size=best.layout.expert_parallel_size)
    config[METADATA_KEY] = {
        "preset": plan.preset,
        "cluster": cluster.describe(),
        "gpus": cluster.gpus,
        "seq_len": plan.seq_len,
        "gradient_checkpointing": best.layout.gradient_checkpointing,
        "predicted_gb_per_gpu": round(best.estimate.gpu_total / GIB, 1),
        "predicted_host_gb_per_node": round(best.estimate.host_total / GIB, 1),
        "generated_by": f"lumina-ds ds-config --preset {plan.preset} --nodes {cluster.nodes} "
        f"--gpus-per-node {cluster.gpus_per_node} --gpu-mem-gb {cluster.gpu_mem_gib:g}",
    }
    return config


def largest_common_ep(wanted: int, num_experts: int, world_size: int) -> int:
    """The largest EP size <= wanted that divides both the experts and the world size."""
    return max(d for d in range(1, wanted + 1) if num_experts % d == 0 and world_size % d == 0)


def adopt_preset_config(
    run: RunConfig, config: dict[str, Any], *, world_size: int, explicit: set[str]
) -> tuple[dict[str, Any], list[str]]:
    """Apply a preset file's layout to `run` (flags in `explicit` win) and return the override for DeepSpeed.

    Batch keys, precision sections, the AutoEP section and the other keys generated from the RunConfig are
    dropped from the override: lumina-ds regenerates them for the real world size, precision and flags, so a
    file planned for 256 GPUs also starts on 8. What stays is what only the file knows (buckets, offload).
    """
    notes: list[str] = []
    meta = config.get(METADATA_KEY, {})
    zero = dict(config.get("zero_optimization", {}))
    file_stage = zero.pop("stage", run.distributed.zero_stage)
    if "zero_stage" not in explicit:
        run.distributed.zero_stage = file_stage
    if run.distributed.zero_stage != file_stage:
        notes.append(
            f"--zero-stage {run.distributed.zero_stage} differs from the file's {file_stage}: its ZeRO keys skipped"
        )
        zero = {}
    if "expert_parallel_size" not in explicit and run.model.moe.enabled:
        wanted = int(config.get("expert_parallel", {}).get("autoep_size", 1))
        run.distributed.expert_parallel_size = largest_common_ep(wanted, run.model.moe.num_experts, world_size)
        ep = run.distributed.expert_parallel_size
        if ep != wanted:
            notes.append(f"expert-parallel size {wanted} does not divide {world_size} GPUs: using {ep}")
    fields = (("micro_batch_size", "train_micro_batch_size_per_gpu"), ("grad_accum", "gradient_accumulation_steps"))
    for name, key in fields:
        if name not in explicit and key in config:
            setattr(run.train, name, int(config[key]))
    if "gradient_checkpointing" not in explicit and "gradient_checkpointing" in meta:
        run.train.gradient_checkpointing = bool(meta["gradient_checkpointing"])
    if meta.get("gpus") not in (None, world_size):
        notes.append(f"planned for {meta['gpus']} GPUs, running on {world_size}: train_batch_size recomputed")
    dropped = {*BATCH_KEYS, *PRECISION_KEYS, *GENERATED_KEYS, METADATA_KEY, "expert_parallel", "zero_optimization"}
    override = {k: v for k, v in config.items() if k not in dropped}
    if zero:
        override["zero_optimization"] = zero
    return override, notes


def write_adopted_config(run: RunConfig, override: dict[str, Any]) -> Path:
    """The override a launch uses, in the run directory (every rank writes the same bytes, atomically)."""
    run_dir = Path(run.logging.output_dir) / run.logging.experiment_name
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "deepspeed_override.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(override, indent=2) + "\n")
    os.replace(tmp, path)
    return path
