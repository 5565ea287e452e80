"""The planner's answer as text (chosen layout, breakdown, why the alternatives lost) or as JSON."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from lumina_ds.config.run import SIGNAL_MARGIN_S
from lumina_ds.planning.memory import format_breakdown
from lumina_ds.planning.memory_inputs import GIB
from lumina_ds.planning.planner import OFFLOAD_MODES, Candidate, Plan


def verdict(candidate: Candidate, best: Candidate) -> str:
    if candidate is best:
        return "chosen"
    if candidate.rejection is not None:
        return f"rejected: {candidate.rejection}"
    return f"fits, {candidate.step_seconds / best.step_seconds:.2f}x the step time"


def representatives(plan: Plan, key: Callable[[Candidate], Hashable]) -> list[Candidate]:
    """Per group: its fastest fitting candidate, else its smallest one (to show by how much it misses)."""
    groups: dict[Hashable, list[Candidate]] = {}
    for c in plan.candidates:
        groups.setdefault(key(c), []).append(c)
    picked = []
    for members in groups.values():
        fitting = [c for c in members if c.rejection is None]
        picked.append(fitting[0] if fitting else min(members, key=lambda c: c.estimate.gpu_total))
    return picked


def alternative_lines(plan: Plan) -> list[str]:
    best = plan.best
    by_stage = representatives(plan, lambda c: (c.layout.zero_stage, c.offload))
    same_stage = [c for c in plan.candidates if c.layout.zero_stage == best.layout.zero_stage]
    by_ep = representatives(
        Plan(plan.preset, plan.cluster, plan.seq_len, plan.precision, best, same_stage),
        lambda c: (c.layout.expert_parallel_size, c.offload),
    )
    by_stage.sort(key=lambda c: (c.layout.zero_stage, OFFLOAD_MODES.index(c.offload)))
    by_ep.sort(key=lambda c: (c.layout.expert_parallel_size, OFFLOAD_MODES.index(c.offload)))
    lines = ["alternatives (best of each ZeRO stage x offload, then each EP at the chosen stage):"]
    seen: set[int] = set()
    for c in [*by_stage, *by_ep]:
        if id(c) in seen:
            continue
        seen.add(id(c))
        lines.append(f"  {c.describe():<72} {c.estimate.gpu_total / GIB:7.1f} GB  {verdict(c, best)}")
    lines += [f"  ruled out: {note}" for note in plan.excluded]
    return lines


def nvme_lines(plan: Plan) -> list[str]:
    nvme, path = plan.best.estimate.nvme, plan.cluster.nvme_path
    if not nvme:
        return []
    return [f"  NVMe: {nvme / GIB:,.0f} GB of swap files per node under {path} (train with --offload-device nvme "
            f"--nvme-path {path})"]  # fmt: skip


def format_plan(plan: Plan) -> str:
    best, cluster = plan.best, plan.cluster
    tokens = plan.global_batch * plan.seq_len
    kept = plan.save_total_limit * plan.checkpoint_bytes + plan.weights_bytes
    lines = [
        f"plan for {plan.preset} on {cluster.describe()} ({cluster.gpus} GPUs), seq {plan.seq_len}, {plan.precision}",
        f"chosen: {best.describe()}",
        f"  global batch {plan.global_batch} rows = {tokens / 1e6:.2f}M tokens per step; "
        f"modelled step time {best.step_seconds:.3g} s",
        f"  checkpoints: {plan.checkpoint_bytes / GIB:,.1f} GB per tag (DeepSpeed states), and the run's last tag "
        f"{plan.weights_bytes / GIB:,.1f} GB of consolidated weights; --save-total-limit {plan.save_total_limit} "
        f"keeps {kept / GIB:,.0f} GB",
        f"  save: about {plan.save_seconds:,.0f} s per tag ({cluster.nodes} node(s) writing {cluster.fs_write_gbps:g} "
        f"GB/s each, --fs-write-gbps), the last tag's weights {plan.weights_seconds:,.0f} s more (rank 0 alone); "
        f"a stop signal must come {plan.signal_lead_seconds:,} s before the kill (a step + a save + "
        f"{SIGNAL_MARGIN_S:.0f} s): #SBATCH --signal=USR1@{plan.signal_lead_seconds}",
        *nvme_lines(plan),
        "",
        format_breakdown(best.estimate, gpu_limit_gib=round(cluster.usable_gpu_gib, 1)),
        "",
        *alternative_lines(plan),
    ]
    return "\n".join(lines)


def candidate_as_dict(c: Candidate) -> dict[str, Any]:
    lay = c.layout
    return {
        "zero_stage": lay.zero_stage,
        "expert_parallel_size": lay.expert_parallel_size,
        "offload": c.offload,
        "micro_batch_size": lay.micro_batch_size,
        "grad_accum": c.grad_accum,
        "activation_checkpointing": lay.recompute,
        "step_seconds": round(c.step_seconds, 3),
        "memory": c.estimate.as_dict(),
        "rejection": c.rejection,
    }


def plan_as_dict(plan: Plan) -> dict[str, Any]:
    c = plan.cluster
    return {
        "preset": plan.preset,
        "cluster": {
            "nodes": c.nodes,
            "gpus_per_node": c.gpus_per_node,
            "gpu_mem_gb": c.gpu_mem_gib,
            "cpu_mem_gb": c.cpu_mem_gib,
            "gpu": c.gpu,
            "memory_headroom": c.headroom,
        },
        "seq_len": plan.seq_len,
        "precision": plan.precision,
        "global_batch": plan.global_batch,
        "chosen": candidate_as_dict(plan.best),
        "alternatives": [
            candidate_as_dict(a) for a in representatives(plan, lambda x: (x.layout.zero_stage, x.offload))
        ],
        "ruled_out": plan.excluded,
        "checkpoint_gb_per_tag": round(plan.checkpoint_bytes / GIB, 1),
        "consolidated_weights_gb": round(plan.weights_bytes / GIB, 1),
        "save_seconds": round(plan.save_seconds, 1),
        "signal_lead_seconds": plan.signal_lead_seconds,
        "save_total_limit": plan.save_total_limit,
    }
