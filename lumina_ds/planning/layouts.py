"""Planned layouts per preset (`lumina_ds/planning/layouts/<preset>.json`, written by `lumina-ds ds-config`).

A layout holds what the plan for the preset's reference cluster decided, in two parts: run-config values under
`lumina_ds.run` (ZeRO stage, expert-parallel size, micro-batch, accumulation, recompute), and the DeepSpeed keys the
run config does not model (bucket sizes, overlap, offload). Every run started with `--preset X` adopts X's layout for
its real number of processes; flags given on the command line win.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from lumina_ds.config.io import deep_merge
from lumina_ds.config.run import RunConfig
from lumina_ds.distributed.ds_config import build_ds_config
from lumina_ds.distributed.expert_parallel import autoep_section
from lumina_ds.models.transformer import meta_transformer
from lumina_ds.planning.hardware import gpu_spec
from lumina_ds.planning.memory_inputs import GIB, Layout
from lumina_ds.planning.planner import Cluster, Plan

# The cluster each checked-in layout is planned for: H100 SXM 80 GB (79.1 GiB as torch reports it), 1 TB host per node
H100 = gpu_spec("h100").memory_gib
REFERENCE_CLUSTERS: dict[str, Cluster] = {
    **{name: Cluster(1, 8, H100) for name in ("debug", "m70_memory", "m120_speed", "b1", "b3_inference")},
    **{name: Cluster(1, 8, H100) for name in ("b6_quality", "b7", "b14")},
    "b50": Cluster(8, 8, H100),
    "b100": Cluster(16, 8, H100),
    "b200": Cluster(32, 8, H100),
    "b300": Cluster(32, 8, H100),
}
LAYOUTS_DIR = Path(__file__).resolve().with_name("layouts")
METADATA_KEY = "lumina_ds"  # our section: the plan's run-config values and where the file came from
PLANNED_TRAIN_FIELDS = ("micro_batch_size", "grad_accum", "activation_checkpointing")


def planned_run(run: RunConfig, plan: Plan) -> RunConfig:
    """A copy of `run` with the plan's ZeRO stage, EP size, batch split, recompute and sequence length."""
    best = plan.best
    planned = copy.deepcopy(run)
    nvme = best.layout.offload_device == "nvme"
    planned.distributed = replace(
        run.distributed,
        zero_stage=best.layout.zero_stage,
        expert_parallel_size=best.layout.expert_parallel_size,
        offload=best.offload,
        offload_device=best.layout.offload_device,
        nvme_path=plan.cluster.nvme_path if nvme else None,
    )
    planned.train = replace(
        run.train,
        micro_batch_size=best.layout.micro_batch_size,
        grad_accum=best.grad_accum,
        activation_checkpointing=best.layout.recompute,
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
        if layout.hpz_partition_size > 1:
            section["zero_hpz_partition_size"] = layout.hpz_partition_size
    if layout.offload_optimizer:
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if layout.offload_param:
        section["offload_param"] = {"device": "cpu", "pin_memory": True}
    return section


def layout_for_plan(run: RunConfig, plan: Plan) -> dict[str, Any]:
    """The layout file of a plan: its run-config values, where it came from, and its DeepSpeed-only keys."""
    best, cluster = plan.best, plan.cluster
    extras = planned_extras(best.layout)
    nvme = {"offload_device": "nvme", "nvme_path": cluster.nvme_path} if best.layout.offload_device == "nvme" else {}
    planned = {
        "distributed": {"zero_stage": best.layout.zero_stage, "expert_parallel_size": best.layout.expert_parallel_size,
                        "offload": best.offload, **nvme},
        "train": {"micro_batch_size": best.layout.micro_batch_size, "grad_accum": best.grad_accum,
                  "activation_checkpointing": best.layout.recompute},
    }  # fmt: skip
    meta = {
        "preset": plan.preset,
        "cluster": cluster.describe(),
        "gpus": cluster.gpus,
        "seq_len": plan.seq_len,
        "predicted_gb_per_gpu": round(best.estimate.gpu_total / GIB, 1),
        "predicted_host_gb_per_node": round(best.estimate.host_total / GIB, 1),
        "generated_by": f"lumina-ds ds-config --preset {plan.preset} --nodes {cluster.nodes} "
        f"--gpus-per-node {cluster.gpus_per_node} --gpu-mem-gb {cluster.gpu_mem_gib:g}",
        "run": planned,
    }
    return {METADATA_KEY: meta, **extras}


def planned_extras(layout: Layout) -> dict[str, Any]:
    """The DeepSpeed keys of a layout that the run config does not own (not the ZeRO stage, not the offload)."""
    owned = ("stage", "offload_optimizer", "offload_param")
    zero = {k: v for k, v in zero_section(layout).items() if k not in owned}
    return {"zero_optimization": zero} if zero else {}


def ds_config_for_plan(run: RunConfig, plan: Plan) -> dict[str, Any]:
    """The complete DeepSpeed JSON a run of this plan is initialised with on the plan's cluster."""
    planned = planned_run(run, plan)
    planned.distributed.deepspeed = deep_merge(planned_extras(plan.best.layout), run.distributed.deepspeed)
    config = build_ds_config(planned, world_size=plan.cluster.gpus, precision=plan.precision)
    ep = plan.best.layout.expert_parallel_size
    if ep > 1 and planned.distributed.moe_backend == "autoep":
        model = meta_transformer(planned.model)
        config["expert_parallel"] = autoep_section(model, ep_size=ep, cuda=True)  # a plan is for GPUs
    return config


def largest_common_ep(wanted: int, num_experts: int, world_size: int) -> int:
    """The largest EP size <= wanted that divides both the experts and the world size."""
    return max(d for d in range(1, wanted + 1) if num_experts % d == 0 and world_size % d == 0)


def load_layout(preset: str) -> dict[str, Any] | None:
    """The checked-in layout of a preset, or None for a preset without one."""
    path = LAYOUTS_DIR / f"{preset}.json"
    return json.loads(path.read_text()) if path.exists() else None


def adopt_layout(run: RunConfig, layout: dict[str, Any], *, world_size: int, explicit: set[str]) -> list[str]:
    """Take a layout's run-config values into `run` (fields named in `explicit` keep their flag values) and merge its
    DeepSpeed keys under the run's own (the user's --deepspeed-config wins). Returns notes for the console.

    The expert-parallel size shrinks to one that divides the real number of processes, so a layout planned for 256
    GPUs also starts on 8; DeepSpeed's batch keys are derived later from the adopted values.
    """
    notes: list[str] = []
    meta = layout[METADATA_KEY]
    planned, extras = meta["run"], {k: v for k, v in layout.items() if k != METADATA_KEY}
    stage = planned["distributed"]["zero_stage"]
    same_stage = "zero_stage" not in explicit or run.distributed.zero_stage == stage
    if not same_stage:  # the planned buckets and offload belong to the planned stage
        notes.append(
            f"--zero-stage {run.distributed.zero_stage} differs from the planned {stage}: its ZeRO keys skipped"
        )
        extras.pop("zero_optimization", None)
    run.distributed.zero_stage = run.distributed.zero_stage if "zero_stage" in explicit else stage
    if same_stage and "offload" not in explicit:
        run.distributed.offload = planned["distributed"].get("offload", "none")
    if "expert_parallel_size" not in explicit and run.model.moe.enabled:
        wanted = int(planned["distributed"]["expert_parallel_size"])
        run.distributed.expert_parallel_size = largest_common_ep(wanted, run.model.moe.num_experts, world_size)
        if run.distributed.expert_parallel_size != wanted:
            notes.append(
                f"expert-parallel size {wanted} does not divide {world_size} GPUs: "
                f"using {run.distributed.expert_parallel_size}"
            )
    train = planned["train"]
    if "gradient_checkpointing" in explicit:  # the alias flag of activation_checkpointing
        explicit = explicit | {"activation_checkpointing"}
    for name in PLANNED_TRAIN_FIELDS:
        if name not in explicit:
            setattr(run.train, name, train[name])
    if meta.get("gpus") not in (None, world_size):
        notes.append(f"planned for {meta['gpus']} GPUs, running on {world_size}: train_batch_size recomputed")
    run.distributed.deepspeed = deep_merge(copy.deepcopy(extras), run.distributed.deepspeed)
    return notes
