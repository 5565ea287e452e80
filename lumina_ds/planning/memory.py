"""Per-GPU memory model: model states under ZeRO 0-3 with expert parallelism and offload, activations
(planning/activations.py), buffers, what a process holds outside torch's allocator, and host and NVMe per node.

Pure arithmetic on a meta-device build (nothing is allocated). Model states follow what DeepSpeed 0.19.8 holds
(bytes per precision: planning/memory_inputs.py):

- ZeRO shards non-expert ("dense") parameters over all ranks and expert parameters over the expert-data-parallel
  group (world / ep) after expert parallelism gave each rank 1/ep of the experts. Either way every rank owns
  (dense + experts) / world of the sharded states.
- ZeRO-3 keeps parameters below the persistence threshold whole on every rank, and keeps gathered what its trace
  uses again within `stage3_max_reuse_distance` (zero3_live_elements), plus the prefetch bucket. Its optimizer
  converts the 16-bit gradient partition to fp32 one sub-group (<= 1e9 elements) at a time, so ZeRO-3 holds
  2 + 2 + 12 bytes/param plus 4 per sub-group element (DeepSpeed's ZeRO-3 estimator counts 18 bytes/param and
  leaves out the 16-bit gradient partition).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from lumina_ds.models.config import ModelConfig
from lumina_ds.planning.activations import activation_bytes
from lumina_ds.planning.memory_inputs import (
    CPU_PROCESS_BYTES,
    CUDA_CONTEXT_BYTES,
    FRAGMENTATION_MARGIN,
    GIB,
    HOST_BUFFER_FACTOR,
    NCCL_COMMUNICATOR_BYTES,
    WEIGHTS_SHARD_BYTES,
    Layout,
    ParamInventory,
    precision_bytes,
)


@dataclass
class MemoryEstimate:
    """Per-GPU bytes by kind (GPU side) and per-node host bytes."""

    gpu: dict[str, float] = field(default_factory=dict)
    host: dict[str, float] = field(default_factory=dict)
    nvme: float = 0.0  # per node: the swap files of states offloaded to NVMe

    @property
    def model_states(self) -> float:
        return self.gpu["parameters"] + self.gpu["gradients"] + self.gpu["optimizer"]

    @property
    def gpu_total(self) -> float:
        return sum(self.gpu.values())

    @property
    def host_total(self) -> float:
        """Construction happens before offloaded states exist: the host peak is the larger of the two."""
        return max(self.host.values(), default=0.0)

    def as_dict(self) -> dict[str, object]:
        gib = {k: round(v / GIB, 3) for k, v in self.gpu.items()}
        host = {k: round(v / GIB, 3) for k, v in self.host.items()}
        return {"gpu_gib": gib, "gpu_total_gib": round(self.gpu_total / GIB, 3), "host_gib_per_node": host,
                "host_total_gib_per_node": round(self.host_total / GIB, 3),
                "nvme_gib_per_node": round(self.nvme / GIB, 3)}  # fmt: skip


def sharded_elements(inv: ParamInventory, layout: Layout) -> float:
    """Elements of sharded state this rank owns: dense / world + (experts / ep) / (world / ep)."""
    return inv.total / layout.gpus


def local_elements(inv: ParamInventory, layout: Layout) -> float:
    """Parameters a rank holds before ZeRO-3: all dense ones, its 1/ep of the experts."""
    return inv.dense + inv.experts / layout.expert_parallel_size


def persistent_elements(inv: ParamInventory, layout: Layout) -> float:
    """ZeRO-3 keeps parameters with at most `persistence_threshold` elements whole on every rank."""
    ep, limit = layout.expert_parallel_size, layout.persistence_threshold
    dense = sum(n for n in inv.dense_sizes if n <= limit)
    return dense + sum(n / ep for n in inv.expert_sizes if n / ep <= limit)


def largest_module_elements(inv: ParamInventory, layout: Layout) -> float:
    """The most parameters one module gathers under ZeRO-3 (experts as this rank holds them)."""
    return max(inv.largest_dense_module, inv.largest_expert_module / layout.expert_parallel_size)


def zero3_live_elements(inv: ParamInventory, layout: Layout) -> float:
    """Parameters gathered at once under ZeRO-3, at its peak: the turn from forward to backward.

    DeepSpeed 0.19.8 releases a module's parameters after use only if they are not used again within
    `stage3_max_reuse_distance` elements of its recorded trace (partitioned_param_coordinator.__params_to_release).
    The trace runs forward, then backward in reverse: a module's next use is 2 x the elements of the modules after it
    away. So every module within half the distance of the end of forward stays gathered into backward; at the default
    1e9 that is the last 5e8 elements, the whole of a small model (the 29-36% ZeRO-3 underestimate of
    benchmarks/NOTES.md). Persistent parameters are counted apart (persistent_elements)."""
    ep, limit = layout.expert_parallel_size, layout.persistence_threshold
    held: dict[int, float] = {}
    after = 0.0  # elements of the modules after this one in forward, as this rank holds them
    for module in reversed(inv.trace):
        sizes = [(i, n / ep if expert else float(n)) for i, n, expert in module]
        if 2 * after < layout.max_reuse_distance:
            held.update((i, n) for i, n in sizes if n > limit)
        after += sum(n for _, n in sizes)
    return max(sum(held.values()), largest_module_elements(inv, layout))


def model_state_bytes(inv: ParamInventory, layout: Layout) -> dict[str, float]:
    """GPU bytes of parameters, gradients and optimizer states (incl. master weights) on one rank."""
    b = precision_bytes(layout.precision, layout.zero_stage)
    if layout.grad_accum_fp32:  # DeepSpeed's gradient buffers (ZeRO-2/3 partitions, ZeRO-1's full copy) are fp32
        b = replace(b, grad=4)
    local, shard = local_elements(inv, layout), sharded_elements(inv, layout)
    stage = layout.zero_stage
    if stage == 1 and layout.grad_accum_fp32 and not layout.offload_optimizer:
        # DeepSpeed's BF16 optimizer: a full fp32 gradient copy whose partition the optimizer steps from
        return {"parameters": local * b.param, "gradients": local * 4.0, "optimizer": shard * (b.master + b.optim)}
    if stage == 3:
        gpu_params = 0.0 if layout.offload_param else shard * b.param
        params = gpu_params + persistent_elements(inv, layout) * b.param
        if layout.hpz_partition_size > 1:  # the secondary partition backward gathers from within the node
            params += local * b.param / layout.hpz_partition_size
    else:
        params = local * b.param
    if layout.offload_optimizer:
        grads = 0.0  # gradients stream to the host partition (DeepSpeed's offload estimate counts none on GPU)
        optim = 0.0
    elif stage == 3:
        grads = shard * b.grad  # the 16-bit gradient partition; its fp32 copy exists one sub-group at a time
        optim = shard * (b.master + b.optim) + min(shard, layout.sub_group_size) * b.master_grad
    elif stage in (1, 2) and b.grad == b.master_grad and layout.gpus > 1:
        # same-dtype gradients (fp32, pure bf16): DeepSpeed keeps the local gradients flat and hands the optimizer
        # a view of its partition, at ZeRO-2 too (measured on CPU, benchmarks/NOTES.md)
        grads = local * b.grad
        optim = shard * (b.master + b.optim)
    else:
        grads = (local if stage <= 1 else shard) * b.grad
        optim = (local if stage == 0 else shard) * b.optimizer_side
    return {"parameters": params, "gradients": grads, "optimizer": optim}


def backward_gradient_bytes(inv: ParamInventory, layout: Layout) -> float:
    """The gradient bytes of model_state_bytes that exist only from backward to the optimizer step, not during
    forward: they take the place of the activations backward frees. ZeRO 0-2 create the gradients (and ZeRO-2 its
    partition, `grads_in_partition`) in backward and free them after the step (`_release_ipg_buffers`); the fp32
    gradient copy the optimizer steps from likewise. ZeRO-3 keeps its flat 16-bit gradient partition for good
    (`grad_partitions_flat_buffer`), and DeepSpeed's BF16 optimizer its fp32 gradient copy (grad_accum_fp32). With
    accumulation the gradients are summed across micro-batches: they live through the next ones' forward."""
    if layout.offload_optimizer or (layout.grad_accum_fp32 and layout.zero_stage == 1):
        return 0.0
    b = precision_bytes(layout.precision, layout.zero_stage)
    if layout.grad_accum_fp32:
        b = replace(b, grad=4)
    states = model_state_bytes(inv, layout)
    shard = sharded_elements(inv, layout)
    if layout.zero_stage == 3:
        return min(shard, layout.sub_group_size) * b.master_grad
    same_dtype_view = layout.zero_stage in (1, 2) and b.grad == b.master_grad and layout.gpus > 1
    master_grads = 0.0 if same_dtype_view or layout.zero_stage == 0 else shard * b.master_grad
    return master_grads if layout.grad_accum > 1 else states["gradients"] + master_grads


def comm_buffer_bytes(inv: ParamInventory, layout: Layout) -> float:
    """Gradient reduction buckets (two with overlap_comm) and, for ZeRO-3, the gathered working set."""
    if layout.zero_stage == 0:
        return 0.0
    b = precision_bytes(layout.precision, layout.zero_stage)
    # ZeRO-1 stages the reduction in the fp32 accumulator dtype, ZeRO-2/3 in the gradient dtype
    bucket_dtype = 4 if layout.zero_stage == 1 else b.grad
    buckets = layout.reduce_bucket_size * bucket_dtype * (2 if layout.overlap else 1)
    if layout.zero_stage < 3:
        return float(buckets)
    gathered = zero3_live_elements(inv, layout) * b.param + largest_module_elements(inv, layout) * b.grad
    return float(buckets + gathered + layout.prefetch_bucket_size * b.param)


def host_bytes(inv: ParamInventory, layout: Layout) -> dict[str, float]:
    """Per-node host memory: building the model (fp32; one module at a time under zero.Init) or offloaded states."""
    b = precision_bytes(layout.precision, layout.zero_stage)
    per_node = min(layout.gpus, layout.gpus_per_node) * HOST_BUFFER_FACTOR
    partitioned_build = layout.zero_stage == 3 and layout.zero_init
    built = max(inv.largest_dense_module, inv.largest_expert_module) if partitioned_build else inv.total
    offloaded = 0.0
    if layout.offload_device == "nvme":  # the states are in files; the host holds pinned swap buffers
        offloaded = nvme_pinned_bytes(inv, layout) / HOST_BUFFER_FACTOR  # pinned already: no extra factor
    elif layout.offload_optimizer:
        offloaded += sharded_elements(inv, layout) * b.optimizer_side
    if layout.offload_param and layout.offload_device != "nvme":
        offloaded += sharded_elements(inv, layout) * b.param
    # consolidated weights at a save: rank 0 fills one safetensors shard (5 GiB by default) while the largest tensor
    # (a layer's gathered experts) is in flight with its copy; the other ranks hold nothing on the host
    largest = max((*inv.dense_sizes, *inv.expert_sizes), default=0) * b.param
    checkpoint = min(WEIGHTS_SHARD_BYTES, inv.total * b.param) + 2 * largest
    return {"construction": built * 4 * per_node, "offloaded_states": offloaded * per_node, "checkpoint": checkpoint}


NVME_PARAM_BUFFERS = 8  # parameter swap buffers per rank (distributed/nvme.py derives 7 for b100 on 8 ranks)


def nvme_pinned_bytes(inv: ParamInventory, layout: Layout) -> float:
    """Pinned host bytes per rank of ZeRO-Infinity's swap buffers (distributed/nvme.py): four optimizer buffers of the
    largest sub-group (fp32 master, two moments, the gradient) and, with parameters on NVMe, NVME_PARAM_BUFFERS of
    the larger of that sub-group and the largest parameter partition, plus the parameters' write-back."""
    b = precision_bytes(layout.precision, layout.zero_stage)
    shard = sharded_elements(inv, layout)
    sub_group = min(shard, layout.sub_group_size)
    pinned = 4 * sub_group * b.master
    if layout.offload_param:
        largest = max((*inv.dense_sizes, *inv.expert_sizes), default=0) / layout.gpus
        pinned += NVME_PARAM_BUFFERS * max(largest, sub_group) * b.param + sub_group * b.param
    return float(pinned)


def nvme_bytes(inv: ParamInventory, layout: Layout) -> float:
    """Per node, the swap files of ZeRO-Infinity: each rank's optimizer states and gradients (and parameters)."""
    if layout.offload_device != "nvme":
        return 0.0
    b = precision_bytes(layout.precision, layout.zero_stage)
    per_rank = sharded_elements(inv, layout) * (b.optimizer_side + (b.param if layout.offload_param else 0))
    return float(per_rank * min(layout.gpus, layout.gpus_per_node))


def checkpoint_tag_bytes(inv: ParamInventory, *, precision: str, zero_stage: int) -> float:
    """Disk one checkpoint tag takes, all ranks together: DeepSpeed's module weights and optimizer states (fp32
    master and Adam moments, over all partitions) plus the consolidated weights in the module dtype."""
    return checkpoint_state_bytes(inv, precision=precision, zero_stage=zero_stage) + consolidated_bytes(
        inv, precision=precision, zero_stage=zero_stage
    )


def checkpoint_state_bytes(inv: ParamInventory, *, precision: str, zero_stage: int) -> float:
    """A tag without consolidated weights (every save but the run's last, with `--consolidate final`): the module's
    weights, the fp32 master weights and Adam's moments, over all partitions."""
    b = precision_bytes(precision, max(zero_stage, 1) if precision == "bf16" else zero_stage)
    return float(inv.total * (b.param + b.master + b.optim))


def consolidated_bytes(inv: ParamInventory, *, precision: str, zero_stage: int) -> float:
    """The consolidated safetensors weights, in the module's dtype."""
    return float(
        inv.total * precision_bytes(precision, max(zero_stage, 1) if precision == "bf16" else zero_stage).param
    )


def nccl_communicators(layout: Layout) -> int:
    """Communicators a rank creates (torch makes one per group at its first collective): the data-parallel group of
    ZeRO's reductions; with EP > 1 the expert-parallel group, counted twice for the per-peer buffers of its
    all-to-all, and the expert-data-parallel group of the expert gradients where it has more than one rank."""
    if layout.gpus == 1:
        return 0
    ep = layout.expert_parallel_size
    if ep == 1:
        return 1
    return 3 + (layout.gpus // ep > 1)


def runtime_bytes(layout: Layout) -> float:
    """What a process holds outside torch's allocator: the CUDA context and its NCCL communicators on a GPU."""
    if layout.device == "cpu":
        return CPU_PROCESS_BYTES
    return CUDA_CONTEXT_BYTES + nccl_communicators(layout) * NCCL_COMMUNICATOR_BYTES


def estimate_memory(config: ModelConfig, layout: Layout, inventory: ParamInventory | None = None) -> MemoryEstimate:
    """Per-GPU and per-node bytes of one training configuration."""
    inv = inventory or ParamInventory.of(config)
    gpu = model_state_bytes(inv, layout)
    gpu.update(activation_bytes(config, layout))
    gpu["comm_buffers"] = comm_buffer_bytes(inv, layout)
    # the peak is at the end of forward or in backward, never both: gradients replace the activations backward frees
    # (a layer recomputed in backward meets the gradients: it is not among them)
    forward_only = gpu["activations"] + gpu["logits"] + gpu["moe_dispatch"]
    gpu["backward_reuse"] = -min(forward_only, backward_gradient_bytes(inv, layout))
    gpu["fragmentation"] = FRAGMENTATION_MARGIN * sum(gpu.values())
    gpu["runtime"] = runtime_bytes(layout)
    return MemoryEstimate(gpu=gpu, host=host_bytes(inv, layout), nvme=nvme_bytes(inv, layout))


def format_breakdown(estimate: MemoryEstimate, *, gpu_limit_gib: float | None = None) -> str:
    """A two-column table of the per-GPU breakdown (GiB) and the per-node host peak."""
    lines = [f"  {'per GPU':<16}{'GiB':>10}"]
    for name, value in estimate.gpu.items():
        lines.append(f"  {name:<16}{value / GIB:>10.2f}")
    total = f"  {'total':<16}{estimate.gpu_total / GIB:>10.2f}"
    if gpu_limit_gib is not None:
        total += f"   (limit {gpu_limit_gib:g})"
    lines.append(total)
    host = ", ".join(f"{k} {v / GIB:.1f}" for k, v in estimate.host.items())
    lines.append(f"  host per node   {estimate.host_total / GIB:>10.1f}   (peak of: {host})")
    return "\n".join(lines)
