"""Pick the fastest layout that fits: ZeRO stage, expert-parallel size, offload, micro-batch, recompute.

Step time is a simple, documented model (docs/planning.md, "Memory model and planner"): compute at an assumed MFU,
plus the bytes each GPU sends for ZeRO collectives and MoE all-to-all over NVLink or the inter-node fabric, plus the
host<->GPU traffic and CPU Adam time of offload. Communication is not assumed to overlap (conservative).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from lumina_ds.config.run import SIGNAL_MARGIN_S, RunConfig
from lumina_ds.distributed.ds_config import fp32_grad_accumulation
from lumina_ds.errors import MemoryPlanError
from lumina_ds.models.config import ModelConfig
from lumina_ds.models.counting import count_parameters
from lumina_ds.planning.hardware import peak_flops
from lumina_ds.planning.memory import (
    MemoryEstimate,
    checkpoint_state_bytes,
    consolidated_bytes,
    estimate_memory,
    local_elements,
    sharded_elements,
)
from lumina_ds.planning.memory_inputs import GIB, Layout, ParamInventory, precision_bytes, with_bucket_rules

INTRA_NODE_BW = 300e9  # bytes/s per GPU in NCCL collectives over NVLink (H100 SXM busbw is ~350-450 GB/s)
INTER_NODE_BW = 40e9  # bytes/s per GPU across nodes (one 400 Gb/s NIC per GPU, ~80% efficiency)
PCIE_BW = 20e9  # bytes/s host<->GPU per GPU for offload (PCIe Gen4/Gen5 x16 in practice)
CPU_ADAM_PARAMS_PER_S = 1e9  # DeepSpeedCPUAdam updates per rank (AVX-512, a few cores per rank)
DEFAULT_MFU = 0.4
MICRO_STEP_OVERHEAD = 0.01  # seconds of launch latency and framework work per micro-step (favours fuller batches)
# a GPU->host sync drains the launch queue: the GPU idles until the host has queued the next kernels again
HOST_SYNC_SECONDS = 100e-6
RECOMPUTE_FACTOR = 8 / 6  # full activation recompute adds one forward pass to forward + backward
RECOMPUTE_MODES = ("none", "attention", "moe", "full")  # TrainConfig.recompute
OFFLOAD_MODES = ("none", "optimizer", "optimizer+params")


NVME_GBPS = 25.0  # GB/s of NVMe reads + writes per node (a DGX H100's 8 U.2 drives sustain more; swaps are 1 MiB)
FS_WRITE_GBPS = 2.0  # GB/s one node writes to the shared filesystem (a parallel FS client; --fs-write-gbps)
NVME_PATH = "/local_nvme"  # where a plan puts ZeRO-Infinity's swap files unless --nvme-path says
DEFAULT_HEADROOM = 0.10  # of GPU and host memory the planner leaves free (--memory-headroom): the model's error


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_mem_gib: float
    cpu_mem_gib: float = 1024.0
    gpu: str = "h100"
    headroom: float = DEFAULT_HEADROOM  # a layout must fit in (1 - headroom) of each memory
    nvme_gib: float = 0.0  # NVMe space per node for ZeRO-Infinity's swap files (0: no NVMe offload)
    nvme_gbps: float = NVME_GBPS
    nvme_path: str = NVME_PATH
    fs_write_gbps: float = FS_WRITE_GBPS

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable_gpu_gib(self) -> float:
        return self.gpu_mem_gib * (1.0 - self.headroom)

    @property
    def usable_cpu_gib(self) -> float:
        return self.cpu_mem_gib * (1.0 - self.headroom)

    @property
    def usable_nvme_gib(self) -> float:
        return self.nvme_gib * (1.0 - self.headroom)

    def describe(self) -> str:
        gpu = f"{self.gpu.upper()} {self.gpu_mem_gib:g} GiB"
        return f"{self.nodes}x{self.gpus_per_node} {gpu}, host {self.cpu_mem_gib:g} GB"


@dataclass
class Candidate:
    layout: Layout
    grad_accum: int
    offload: str
    estimate: MemoryEstimate
    step_seconds: float
    rejection: str | None = None  # None: it fits

    def describe(self) -> str:
        lay = self.layout
        ckpt = f"recompute {lay.recompute}"
        where = " to NVMe" if lay.offload_device == "nvme" else ""
        return (f"ZeRO-{lay.zero_stage} EP {lay.expert_parallel_size} offload {self.offload}{where} "
                f"micro-batch {lay.micro_batch_size} x accum {self.grad_accum} {ckpt}")  # fmt: skip


@dataclass
class Plan:
    preset: str
    cluster: Cluster
    seq_len: int
    precision: str
    best: Candidate
    candidates: list[Candidate] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)  # layouts ruled out before any arithmetic
    checkpoint_bytes: float = 0.0  # one checkpoint tag on disk without consolidated weights, all ranks together
    save_total_limit: int = 1  # tags kept (the run's --save-total-limit)
    weights_bytes: float = 0.0  # the consolidated weights the run's last tag adds (--consolidate final)

    @property
    def save_seconds(self) -> float:
        """One tag's DeepSpeed states, every node writing its ranks' share at once."""
        return self.checkpoint_bytes / (self.cluster.nodes * self.cluster.fs_write_gbps * 1e9)

    @property
    def weights_seconds(self) -> float:
        """The last tag's consolidated weights: rank 0 writes them alone."""
        return self.weights_bytes / (self.cluster.fs_write_gbps * 1e9)

    @property
    def signal_lead_seconds(self) -> int:
        """How early a stop signal must come: the step in progress, a save, the margin."""
        return math.ceil(self.best.step_seconds + self.save_seconds + SIGNAL_MARGIN_S)

    @property
    def global_batch(self) -> int:
        return self.best.layout.micro_batch_size * self.best.grad_accum * self.cluster.gpus


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def expert_parallel_sizes(model: ModelConfig, gpus: int) -> list[int]:
    """EP must divide both the number of experts and the number of GPUs (GPUs = DP x EP)."""
    if not model.moe.enabled:
        return [1]
    return [d for d in divisors(model.moe.num_experts) if gpus % d == 0]


def layout_space(run: RunConfig, cluster: Cluster, *, seq_len: int, precision: str) -> list[tuple[Layout, str, int]]:
    """Every (layout, offload mode, grad accum) the planner considers, before memory."""
    rows_per_gpu = run.train.micro_batch_size * run.train.grad_accum  # the preset's rows per GPU per step
    stages = [0, 1, 2, 3] if run.distributed.moe_backend != "native" else [0, 1, 2]
    if precision == "bf16":
        stages = [s for s in stages if s > 0]
    base = Layout(zero_stage=0, gpus=cluster.gpus, gpus_per_node=cluster.gpus_per_node, seq_len=seq_len,
                  precision=precision)  # fmt: skip
    base = with_bucket_rules(base, run.model)
    space = []
    for stage in stages:
        offloads = {0: ["none"], 1: ["none"], 2: ["none", "optimizer"], 3: list(OFFLOAD_MODES)}[stage]
        for ep in expert_parallel_sizes(run.model, cluster.gpus):
            for offload, device in offload_choices(offloads, stage=stage, ep=ep, cluster=cluster):
                for hpz in hpz_choices(stage=stage, ep=ep, offload=offload, cluster=cluster):
                    for micro in divisors(rows_per_gpu):
                        for ckpt in RECOMPUTE_MODES:
                            accum = rows_per_gpu // micro
                            layout = replace(base, zero_stage=stage, expert_parallel_size=ep, micro_batch_size=micro,
                                             recompute=ckpt, offload_optimizer=offload != "none",
                                             offload_param=offload == "optimizer+params", offload_device=device,
                                             grad_accum_fp32=fp32_grad_accumulation(precision, stage, accum),
                                             hpz_partition_size=hpz, grad_accum=accum)  # fmt: skip
                            space.append((layout, offload, accum))
    return space


def hpz_choices(*, stage: int, ep: int, offload: str, cluster: Cluster) -> list[int]:
    """ZeRO++ hierarchical partitioning (a secondary parameter copy per node, gathered over NVLink in backward) at
    ZeRO-3 across nodes: DeepSpeed 0.19.8 refuses it with AutoEP (EP > 1) and has it keep the parameters on the GPU."""
    if stage == 3 and ep == 1 and offload != "optimizer+params" and cluster.nodes > 1:
        return [1, cluster.gpus_per_node]
    return [1]


def offload_choices(offloads: list[str], *, stage: int, ep: int, cluster: Cluster) -> list[tuple[str, str]]:
    """(offload mode, device) pairs: host memory, and with NVMe space at ZeRO-3 the same modes on NVMe, where
    DeepSpeed 0.19.8 cannot checkpoint AutoEP experts spread over ranks (expert-parallel size 1 only)."""
    choices = [(mode, "cpu") for mode in offloads]
    if stage == 3 and cluster.nvme_gib > 0 and ep == 1:
        choices += [(mode, "nvme") for mode in offloads if mode != "none"]
    return choices


def collective_bw(group: int, cluster: Cluster) -> float:
    return INTRA_NODE_BW if group <= cluster.gpus_per_node else INTER_NODE_BW


def zero_comm_seconds(inv: ParamInventory, layout: Layout, grad_accum: int, cluster: Cluster) -> float:
    """ZeRO's collectives per optimizer step, each GPU moving ~1x the buffer per ring pass, over the fabric its group
    spans. ZeRO-3 gathers the parameters in forward, backward (and the recompute's forward) of every micro-step;
    with hpZ only the forward gather crosses nodes, the others read the node's secondary copy."""
    b = precision_bytes(layout.precision, layout.zero_stage)
    local = local_elements(inv, layout)
    stage, world = layout.zero_stage, collective_bw(layout.gpus, cluster)
    if layout.gpus == 1:
        return 0.0
    if stage == 0:
        return 2 * local * b.grad / world  # all-reduce once per step
    if stage == 1:
        return local * (b.grad + b.param) / world  # reduce-scatter once, all-gather the updated params once
    if stage == 2:
        return (grad_accum * local * b.grad + local * b.param) / world  # gradients reduced every micro-step
    later_gathers = 2 if layout.gradient_checkpointing else 1  # backward (+ the recompute's forward)
    within_node = layout.hpz_partition_size > 1
    gathers = grad_accum * local * b.param
    seconds = gathers / world + grad_accum * local * b.grad / world
    later = gathers * later_gathers
    return seconds + later / (collective_bw(layout.hpz_partition_size, cluster) if within_node else world)


def host_syncs(model: ModelConfig, layout: Layout, grad_accum: int, *, async_split_plan: bool) -> int:
    """GPU->host syncs per step: AutoEP reads each MoE layer's split plan back in every pass (forward, backward, the
    recompute's forward) unless `async_split_plan` overlaps the copy with the token packing (set on CUDA, EP > 1)."""
    if layout.expert_parallel_size == 1 or async_split_plan:
        return 0
    moe_layers = sum(model.moe.is_moe_layer(i) for i in range(model.num_layers))
    passes = 3 if layout.recompute in ("full", "moe") else 2
    return grad_accum * passes * moe_layers


def all_to_all_bytes(model: ModelConfig, layout: Layout, grad_accum: int) -> float:
    """AutoEP dispatch + combine per MoE layer, forward and backward (+ recompute), the off-rank share."""
    ep = layout.expert_parallel_size
    if ep == 1:
        return 0.0
    moe = model.moe
    moe_layers = sum(moe.is_moe_layer(i) for i in range(model.num_layers))
    passes = 6 if layout.recompute in ("full", "moe") else 4  # recomputing the MoE block dispatches again
    act = precision_bytes(layout.precision, layout.zero_stage).act
    tokens = layout.micro_batch_size * layout.seq_len * moe.top_k
    return grad_accum * passes * moe_layers * tokens * model.hidden_size * act * (ep - 1) / ep


def recompute_factor(model: ModelConfig, layout: Layout) -> float:
    """Compute relative to no recompute: backward re-runs the forward of what is checkpointed.

    Forward FLOPs per token and layer: 2 x the attention projections plus 2 x seq x q-width for the causal scores and
    values, against 2 x the active FFN weights (top-k routed + shared experts, or the dense SwiGLU); the LM head
    is left out of the share.
    """
    if layout.recompute in ("none", "full"):
        return RECOMPUTE_FACTOR if layout.recompute == "full" else 1.0
    h, q, kv = model.hidden_size, model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    attention = 2 * (2 * h * q + 2 * h * kv) + 2 * layout.seq_len * q
    moe = model.moe
    routed = 3 * h * (moe.top_k * moe.expert_intermediate_size + moe.num_shared_experts * moe.shared_intermediate_size)
    ffn = [2 * (routed if moe.is_moe_layer(i) else 3 * h * model.intermediate_size) for i in range(model.num_layers)]
    mean_ffn = sum(ffn) / len(ffn)
    share = (attention if layout.recompute == "attention" else mean_ffn) / (attention + mean_ffn)
    return 1.0 + (RECOMPUTE_FACTOR - 1.0) * share


def offload_seconds(inv: ParamInventory, layout: Layout, grad_accum: int) -> float:
    """CPU Adam over this rank's shard, gradients down and params up over PCIe (params each gather if offloaded)."""
    if not layout.offload_optimizer:
        return 0.0
    b = precision_bytes(layout.precision, layout.zero_stage)
    shard = sharded_elements(inv, layout)
    seconds = shard / CPU_ADAM_PARAMS_PER_S + shard * (b.master_grad + b.param) / PCIE_BW
    if layout.offload_param:
        gathers = 3 if layout.gradient_checkpointing else 2
        seconds += grad_accum * gathers * shard * b.param / PCIE_BW
    return seconds


def nvme_seconds(inv: ParamInventory, layout: Layout, grad_accum: int, cluster: Cluster) -> float:
    """ZeRO-Infinity's file traffic per step at this rank's share of the node's NVMe bandwidth: the optimizer states
    and gradients read and written once, the parameters read at every gather and written once."""
    if layout.offload_device != "nvme":
        return 0.0
    b = precision_bytes(layout.precision, layout.zero_stage)
    shard = sharded_elements(inv, layout)
    moved = 2 * shard * b.optimizer_side
    if layout.offload_param:
        gathers = 3 if layout.gradient_checkpointing else 2
        moved += (grad_accum * gathers + 1) * shard * b.param
    per_rank = cluster.nvme_gbps * 1e9 / min(layout.gpus, layout.gpus_per_node)
    return moved / per_rank


def step_seconds(
    model: ModelConfig,
    inv: ParamInventory,
    layout: Layout,
    *,
    grad_accum: int,
    cluster: Cluster,
    flops: float,
    mfu: float,
    async_split_plan: bool = True,
) -> float:
    """Compute at `mfu` of the GPU's peak, a fixed cost per micro-step and per host sync, ZeRO and all-to-all traffic
    and offload, without overlap. `async_split_plan`: as runs set it on CUDA (False: before they did)."""
    tokens = layout.micro_batch_size * grad_accum * layout.seq_len
    compute = flops * tokens * recompute_factor(model, layout)
    seconds = compute / (peak_flops(cluster.gpu, layout.precision) * mfu) + grad_accum * MICRO_STEP_OVERHEAD
    seconds += zero_comm_seconds(inv, layout, grad_accum, cluster)
    seconds += host_syncs(model, layout, grad_accum, async_split_plan=async_split_plan) * HOST_SYNC_SECONDS
    a2a = all_to_all_bytes(model, layout, grad_accum)
    seconds += a2a / collective_bw(layout.expert_parallel_size, cluster)
    return seconds + offload_seconds(inv, layout, grad_accum) + nvme_seconds(inv, layout, grad_accum, cluster)


def rejection_of(estimate: MemoryEstimate, cluster: Cluster) -> str | None:
    """Why an estimate does not fit the cluster with its headroom kept free, or None."""
    kept = f" less {cluster.headroom:.0%} headroom" if cluster.headroom else ""
    if estimate.gpu_total > cluster.usable_gpu_gib * GIB:
        return (
            f"GPU {estimate.gpu_total / GIB:.1f} GB > {cluster.usable_gpu_gib:.1f} GB ({cluster.gpu_mem_gib:g}{kept})"
        )
    if estimate.host_total > cluster.usable_cpu_gib * GIB:
        return (f"host {estimate.host_total / GIB:.0f} GB/node > {cluster.usable_cpu_gib:.0f} GB "
                f"({cluster.cpu_mem_gib:g}{kept})")  # fmt: skip
    if estimate.nvme > cluster.usable_nvme_gib * GIB:
        return (
            f"NVMe {estimate.nvme / GIB:,.0f} GB/node > {cluster.usable_nvme_gib:,.0f} GB ({cluster.nvme_gib:g}{kept})"
        )
    return None


Rejection = Callable[[MemoryEstimate, Cluster], "str | None"]


def evaluate(
    run: RunConfig,
    cluster: Cluster,
    inv: ParamInventory,
    *,
    seq_len: int,
    precision: str,
    mfu: float,
    reject: Rejection = rejection_of,
) -> list[Candidate]:
    """Memory and step time of every layout in the search space, fastest first; `reject` says why one does not fit
    (the launch gate counts a CPU's processes and host together)."""
    flops = count_parameters(run.model, seq_len=seq_len).flops_per_token
    candidates = []
    for layout, offload, accum in layout_space(run, cluster, seq_len=seq_len, precision=precision):
        estimate = estimate_memory(run.model, layout, inv)
        seconds = step_seconds(run.model, inv, layout, grad_accum=accum, cluster=cluster, flops=flops, mfu=mfu)
        candidates.append(Candidate(layout, accum, offload, estimate, seconds, reject(estimate, cluster)))
    # fastest first; among equals the one with more headroom
    candidates.sort(key=lambda c: (round(c.step_seconds, 6), c.estimate.gpu_total))
    return candidates


def excluded_layouts(run: RunConfig, cluster: Cluster) -> list[str]:
    """Layouts ruled out by rules rather than memory, to show why they are not in the table."""
    notes = []
    moe = run.model.moe
    if moe.enabled:
        bad = [d for d in divisors(moe.num_experts) if cluster.gpus % d]
        if bad:
            notes.append(f"EP {bad}: must divide the {cluster.gpus} GPUs (GPUs = DP x EP)")
    if run.distributed.moe_backend == "native":
        notes.append("ZeRO-3: DeepSpeed refuses the native MoE layer at stage 3 (use --moe-backend autoep)")
    return notes


def plan(
    run: RunConfig, cluster: Cluster, *, seq_len: int | None = None, precision: str = "auto", mfu: float = DEFAULT_MFU
) -> Plan:
    """The fastest fitting layout; MemoryPlanError E201 (GPU) / E202 (host) with what would fit otherwise."""
    seq = seq_len or run.seq_len
    prec = "mixed_bf16" if precision == "auto" else precision
    inv = ParamInventory.of(run.model)
    candidates = evaluate(run, cluster, inv, seq_len=seq, precision=prec, mfu=mfu)
    fitting = [c for c in candidates if c.rejection is None]
    if not fitting:
        raise nothing_fits(run, cluster, candidates, inv, seq_len=seq, precision=prec)
    stage = fitting[0].layout.zero_stage
    states = checkpoint_state_bytes(inv, precision=prec, zero_stage=stage)
    weights = consolidated_bytes(inv, precision=prec, zero_stage=stage)
    return Plan(run.preset, cluster, seq, prec, fitting[0], candidates, excluded_layouts(run, cluster), states,
                run.checkpoint.save_total_limit, weights)  # fmt: skip


def smallest_footprint(
    run: RunConfig, cluster: Cluster, inv: ParamInventory, *, seq_len: int, precision: str
) -> Candidate:
    """The least GPU memory any layout needs (micro-batch 1, recompute), regardless of speed."""
    space = [s for s in layout_space(run, cluster, seq_len=seq_len, precision=precision)
             if s[0].micro_batch_size == 1 and s[0].recompute == "full"]  # fmt: skip
    options = [Candidate(lay, acc, off, estimate_memory(run.model, lay, inv), 0.0) for lay, off, acc in space]
    return min(options, key=lambda c: c.estimate.gpu_total)


def what_would_fit(run: RunConfig, cluster: Cluster, inv: ParamInventory, *, seq_len: int, precision: str) -> list[str]:
    """More nodes, offload, or a shorter sequence: the first that makes some layout fit."""
    hints = []
    for nodes in (2**i for i in range(0, 11)):
        if nodes <= cluster.nodes:
            continue
        bigger = replace(cluster, nodes=nodes)
        best = smallest_footprint(run, bigger, inv, seq_len=seq_len, precision=precision)
        if rejection_of(best.estimate, bigger) is None:
            hints.append(f"--nodes {nodes} ({best.describe()}: {best.estimate.gpu_total / GIB:.1f} GB/GPU)")
            break
    seq = seq_len // 2
    while seq >= 256:
        best = smallest_footprint(run, cluster, inv, seq_len=seq, precision=precision)
        if rejection_of(best.estimate, cluster) is None:
            hints.append(f"--seq-len {seq} on this cluster ({best.describe()})")
            break
        seq //= 2
    return hints


def nothing_fits(
    run: RunConfig,
    cluster: Cluster,
    candidates: list[Candidate],
    inv: ParamInventory,
    *,
    seq_len: int,
    precision: str,
) -> MemoryPlanError:
    least = min(candidates, key=lambda c: c.estimate.gpu_total)
    gpu_ok = [c for c in candidates if c.estimate.gpu_total <= cluster.usable_gpu_gib * GIB]
    hints = what_would_fit(run, cluster, inv, seq_len=seq_len, precision=precision)
    if gpu_ok:
        host = min(c.estimate.host_total for c in gpu_ok)
        offloaded = any(c.offload != "none" for c in gpu_ok)
        what = "offloaded optimizer states" if offloaded else "building the model"
        return MemoryPlanError(
            "E202",
            f"{run.preset} fits in GPU memory on {cluster.describe()} only with {what} needing "
            f"{host / GIB:.0f} GB of host memory per node (> {cluster.usable_cpu_gib:.0f} GB: "
            f"{cluster.cpu_mem_gib:g} less {cluster.headroom:.0%} headroom)",
            "; or ".join(["more host memory (--cpu-mem-gb)", *hints]),
        )
    return MemoryPlanError(
        "E201",
        f"{run.preset} does not fit in {cluster.usable_gpu_gib:.1f} GB per GPU ({cluster.gpu_mem_gib:g} less "
        f"{cluster.headroom:.0%} headroom) on {cluster.describe()}: the smallest "
        f"layout ({least.describe()}) needs {least.estimate.gpu_total / GIB:.1f} GB per GPU",
        "; or ".join(hints) if hints else "use GPUs with more memory, or a smaller preset",
    )
