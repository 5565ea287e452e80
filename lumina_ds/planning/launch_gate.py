"""The launch-time plan: a resolved run checked against the machine it starts on, with `plan`'s memory model, before
any tokenizer, data or model work.

A preset's checked-in layout was planned for its reference cluster (16x8 H100 for b100). On the cluster a run really
has (the launcher's world size and ranks per node, each GPU's memory as torch reports it, the host's RAM), the layout
either fits, or the fastest layout that fits is taken (the layout fields the user set stay as set), or nothing fits
and the run stops with `plan`'s E201/E202 and its hint. On a CPU the model states, activations and offloaded states
all live in host RAM: the gate counts them together against the host's memory."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from lumina_ds.config.run import RunConfig
from lumina_ds.distributed.ds_config import fp32_grad_accumulation
from lumina_ds.errors import MemoryPlanError
from lumina_ds.planning.hardware import gpu_spec_of_device
from lumina_ds.planning.memory import MemoryEstimate, estimate_memory
from lumina_ds.planning.memory_inputs import GIB, Layout, ParamInventory, with_bucket_rules
from lumina_ds.planning.planner import (
    DEFAULT_HEADROOM,
    DEFAULT_MFU,
    Candidate,
    Cluster,
    evaluate,
    layout_space,
    nothing_fits,
    rejection_of,
)

# run fields a re-plan may choose, by the flag dest that sets each (a flag given on the command line keeps its value)
PLANNED_FIELDS = ("zero_stage", "expert_parallel_size", "offload", "micro_batch_size", "grad_accum",
                  "activation_checkpointing")  # fmt: skip


@dataclass(frozen=True)
class Machine:
    """What a run starts on: processes, processes per node, each GPU's memory (None on a CPU), RAM per node."""

    world_size: int
    ranks_per_node: int
    device_gib: float | None
    host_gib: float
    gpu: str = "h100"  # the GPU table's key for the step-time model (h100's peak when the GPU is not in the table)
    headroom: float = DEFAULT_HEADROOM  # of each memory left free (--memory-headroom)
    nvme_gib: float = 0.0  # free space at --nvme-path (ZeRO-Infinity's swap files)

    @property
    def cluster(self) -> Cluster:
        nodes = max(1, self.world_size // self.ranks_per_node)
        per_rank = self.device_gib if self.device_gib is not None else self.host_gib / self.ranks_per_node
        return Cluster(nodes, min(self.ranks_per_node, self.world_size), per_rank, self.host_gib, self.gpu,
                       self.headroom, nvme_gib=self.nvme_gib)  # fmt: skip

    def describe(self) -> str:
        nodes = max(1, self.world_size // self.ranks_per_node)
        if self.device_gib is None:
            return f"{nodes}x{self.ranks_per_node} CPU process(es), host {self.host_gib:.1f} GiB per node"
        return (
            f"{nodes}x{self.ranks_per_node} {self.gpu.upper()} {self.device_gib:.1f} GiB, host {self.host_gib:.0f} GiB"
        )


def this_machine(*, world_size: int, ranks_per_node: int, local_rank: int, headroom: float = DEFAULT_HEADROOM,
                 nvme_path: str | None = None) -> Machine:  # fmt: skip
    """The machine this process runs on, read without starting anything (no process group, no CUDA context); with
    `nvme_path`, the free space there for ZeRO-Infinity's swap files."""
    host = psutil.virtual_memory().total / GIB  # the total, not what is free now: the same on every rank of a node
    nvme = shutil.disk_usage(nvme_path).free / GIB if nvme_path and Path(nvme_path).is_dir() else 0.0
    if not torch.cuda.is_available():
        return Machine(world_size, ranks_per_node, None, host, "h100", headroom, nvme)
    device = local_rank % torch.cuda.device_count()
    props = torch.cuda.get_device_properties(device)
    spec = gpu_spec_of_device(props.name)
    gpu = spec.key if spec else "h100"
    return Machine(world_size, ranks_per_node, props.total_memory / GIB, host, gpu, headroom, nvme)


def run_layout(run: RunConfig, machine: Machine, precision: str) -> Layout:
    """The memory model's layout of a run as resolved, on `machine`, with the ZeRO keys of its DeepSpeed JSON that
    the model counts (hpZ's secondary copy, ZeRO-3's reuse window)."""
    dist, train = run.distributed, run.train
    zero = dist.deepspeed.get("zero_optimization", {})
    layout = Layout(zero_stage=dist.zero_stage, gpus=machine.world_size,
                    gpus_per_node=min(machine.ranks_per_node, machine.world_size),
                    expert_parallel_size=dist.expert_parallel_size, micro_batch_size=train.micro_batch_size,
                    seq_len=run.seq_len, recompute=train.recompute, precision=precision,
                    offload_optimizer=dist.offload != "none", offload_param=dist.offload == "optimizer+params",
                    offload_device=dist.offload_device, device="cpu" if machine.device_gib is None else "gpu",
                    grad_accum=train.grad_accum, hpz_partition_size=int(zero.get("zero_hpz_partition_size", 1)),
                    max_reuse_distance=int(zero.get("stage3_max_reuse_distance", 1_000_000_000)),
                    grad_accum_fp32=fp32_grad_accumulation(precision, dist.zero_stage, train.grad_accum))  # fmt: skip
    return with_bucket_rules(layout, run.model)


def rejection_on(machine: Machine) -> Callable[[MemoryEstimate, Cluster], str | None]:
    """Why an estimate does not fit `machine`: on GPUs, `plan`'s rule; on a CPU, every process's device-side bytes
    and the host-side bytes share the host's RAM."""
    if machine.device_gib is not None:
        return rejection_of

    def on_cpu(estimate: MemoryEstimate, cluster: Cluster) -> str | None:
        need = estimate.gpu_total * cluster.gpus_per_node + estimate.host_total
        if need > cluster.usable_cpu_gib * GIB:
            return (f"host {need / GIB:.1f} GiB/node > {cluster.usable_cpu_gib:.1f} GiB ({cluster.cpu_mem_gib:.1f} "
                    f"less {cluster.headroom:.0%} headroom)")  # fmt: skip
        return None

    return on_cpu


def check_launch(run: RunConfig, machine: Machine, *, precision: str, explicit: set[str],
                 planned_for: str | None) -> str | None:  # fmt: skip
    """None when the run's layout fits `machine`. Else, for a run whose layout came from its preset's plan
    (`planned_for`: that plan's cluster), the fastest layout that fits, applied to `run` (fields in `explicit` as
    set), and the line that says so; MemoryPlanError (E201/E202 with `plan`'s hint) when nothing fits."""
    inv = ParamInventory.of(run.model)
    reject = rejection_on(machine)
    estimate = estimate_memory(run.model, run_layout(run, machine, precision), inv)
    why = reject(estimate, machine.cluster)
    if why is None:
        return None
    candidates = evaluate(run, machine.cluster, inv, seq_len=run.seq_len, precision=precision, mfu=DEFAULT_MFU,
                          reject=reject)  # fmt: skip
    allowed = [c for c in candidates if c.rejection is None and keeps(c, run, explicit)] if planned_for else []
    if not allowed:
        raise refusal(run, machine, candidates, inv, precision=precision, why=why)
    best = allowed[0]
    apply_candidate(run, best)
    return (f"planned for {planned_for}, re-planned for {machine.describe()}: {best.describe()}, "
            f"{best.estimate.gpu_total / GIB:.1f} GiB per process (the planned layout needs {why})")  # fmt: skip


def keeps(candidate: Candidate, run: RunConfig, explicit: set[str]) -> bool:
    """Whether a candidate leaves every layout field the user set as set."""
    lay, dist, train = candidate.layout, run.distributed, run.train
    chosen = {"zero_stage": (lay.zero_stage, dist.zero_stage),
              "expert_parallel_size": (lay.expert_parallel_size, dist.expert_parallel_size),
              "offload": (candidate.offload, dist.offload),
              "micro_batch_size": (lay.micro_batch_size, train.micro_batch_size),
              "grad_accum": (candidate.grad_accum, train.grad_accum),
              "activation_checkpointing": (lay.recompute, train.recompute)}  # fmt: skip
    return all(new == old for name, (new, old) in chosen.items() if name in explicit)


def apply_candidate(run: RunConfig, best: Candidate) -> None:
    """Take a re-planned layout into the (not yet frozen) run."""
    run.distributed.zero_stage = best.layout.zero_stage
    run.distributed.expert_parallel_size = best.layout.expert_parallel_size
    run.distributed.offload = best.offload
    run.train.micro_batch_size, run.train.grad_accum = best.layout.micro_batch_size, best.grad_accum
    run.train.activation_checkpointing = best.layout.recompute
    if best.layout.zero_stage != 3:  # the planned ZeRO-3 keys belong to the planned stage
        zero = run.distributed.deepspeed.get("zero_optimization", {})
        for key in [k for k in zero if k.startswith("stage3_") or k == "sub_group_size"]:
            del zero[key]


def refusal(run: RunConfig, machine: Machine, candidates: list[Candidate], inv: ParamInventory, *,
            precision: str, why: str) -> MemoryPlanError:  # fmt: skip
    """`plan`'s error for this machine; on a CPU, E202 in host terms (all memory there is host memory)."""
    cluster = machine.cluster
    error = nothing_fits(run, cluster, candidates, inv, seq_len=run.seq_len, precision=precision)
    if machine.device_gib is not None:  # plan's hint names plan's flags: say how they apply to a launch
        hint = f"{error.hint} (as `lumina-ds plan --preset {run.preset}` takes them: launch on that many nodes)"
        return MemoryPlanError(error.code, f"on this machine: {error.message}", hint)
    least = min(candidates, key=lambda c: c.estimate.gpu_total * cluster.gpus_per_node + c.estimate.host_total)
    need = least.estimate.gpu_total * cluster.gpus_per_node + least.estimate.host_total
    fits = presets_that_fit(machine, precision=precision)
    here = f"presets that fit this machine: {', '.join(fits)}" if fits else "no preset fits this machine"
    return MemoryPlanError(
        "E202",
        f"{run.preset} does not fit this machine ({machine.describe()}): the layout as resolved needs {why}, and the "
        f"smallest layout ({least.describe()}) {need / GIB:,.0f} GiB of host memory per node",
        f"{here}; `lumina-ds plan --preset {run.preset} --nodes N` shows the GPU clusters {run.preset} fits",
    )


def presets_that_fit(machine: Machine, *, precision: str) -> list[str]:
    """The presets with a layout (micro-batch 1, full recompute) that fits a CPU machine, by `rejection_on`."""
    from lumina_ds.config.presets import PRESETS, get_preset

    reject, cluster, fits = rejection_on(machine), machine.cluster, []
    for name in PRESETS:
        preset = get_preset(name)
        inv = ParamInventory.of(preset.model)
        space = layout_space(preset, cluster, seq_len=preset.seq_len, precision=precision)
        smallest = [lay for lay, _, _ in space if lay.micro_batch_size == 1 and lay.recompute == "full"]
        if any(reject(estimate_memory(preset.model, lay, inv), cluster) is None for lay in smallest):
            fits.append(name)
    return fits
