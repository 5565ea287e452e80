"""What the memory model reads: bytes per parameter and activation for each precision, a model's parameters as
ZeRO sees them (from a meta-device build), and a layout on the cluster. The precision rules are DeepSpeed 0.19.8's:

- Mixed precision (mixed_bf16, mixed_fp16, fp16): 16-bit params (2) and grads (2), plus for the optimizer an fp32
  master copy (4), an fp32 gradient partition (4) and Adam's m and v (8): 2 + 2 + 16 bytes/param, the "18" of
  DeepSpeed's estimators being 2 (16-bit grads) + 16 once gradients are sharded. Pure bf16 keeps master, master
  grads and Adam states in bf16 (2 + 2 + 8). fp32 keeps 4-byte params and grads; ZeRO >= 1 still clones an fp32
  master partition (4) and flattens an fp32 gradient partition (4); ZeRO-0 fp32 is plain torch AdamW (4 + 4 + 8).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lumina_ds.errors import ConfigError
from lumina_ds.models.config import ModelConfig
from lumina_ds.models.counting import component_of, count_parameters, module_sizes

GIB = 1024**3
HOST_BUFFER_FACTOR = 1.5  # DeepSpeed's estimators' additional_buffer_factor for host memory (pinned buffers)
FRAGMENTATION_MARGIN = 0.08  # caching-allocator fragmentation on top of everything counted
# outside torch's allocator, per process (runtime_bytes): to be confirmed on a GPU (benchmarks/gpu_check.sh)
CUDA_CONTEXT_BYTES = 0.75 * GIB  # the CUDA context with its kernels loaded, cuBLAS and cuDNN workspaces
NCCL_COMMUNICATOR_BYTES = 0.65 * GIB  # one communicator's channel buffers (NVIDIA/nccl#964: 544-688 MB a group)
CPU_PROCESS_BYTES = 0.5 * GIB  # a CPU rank: torch, DeepSpeed, its engine, gloo (memory_check.py: ~0.4 GiB RSS)
WEIGHTS_SHARD_BYTES = 5 * GIB  # CheckpointConfig.weights_shard_mb's default


@dataclass(frozen=True)
class PrecisionBytes:
    """Bytes per parameter of each model state, and per stored activation element."""

    param: int
    grad: int
    master: int  # the optimizer's copy of the weights (0: the optimizer updates the params in place)
    master_grad: int  # gradients handed to the optimizer in the master dtype
    optim: int  # Adam exp_avg + exp_avg_sq
    act: int

    @property
    def optimizer_side(self) -> int:
        return self.master + self.master_grad + self.optim


def precision_bytes(precision: str, zero_stage: int) -> PrecisionBytes:
    """What DeepSpeed holds per parameter for a precision mode (`auto` plans for a bf16 GPU: mixed_bf16)."""
    if precision in ("auto", "mixed_bf16", "mixed_fp16", "fp16"):
        return PrecisionBytes(param=2, grad=2, master=4, master_grad=4, optim=8, act=2)
    if precision == "bf16":
        assert zero_stage > 0, "pure bf16 needs ZeRO 1-3 (RunConfig.validate refuses it; the planner skips it)"
        return PrecisionBytes(param=2, grad=2, master=2, master_grad=2, optim=4, act=2)
    if precision == "fp32":
        if zero_stage == 0:
            return PrecisionBytes(param=4, grad=4, master=0, master_grad=0, optim=8, act=4)
        return PrecisionBytes(param=4, grad=4, master=4, master_grad=4, optim=8, act=4)
    raise ConfigError("E002", f"unknown precision {precision!r}")


@dataclass(frozen=True)
class ParamInventory:
    """Parameter numels of a model, split into routed-expert and other ("dense") parameters."""

    dense_sizes: tuple[int, ...]  # numel of every non-expert parameter (tied weights once)
    expert_sizes: tuple[int, ...]  # numel of every routed-expert parameter, all experts of a layer together
    largest_dense_module: int  # most non-expert params one module holds directly (what ZeRO-3 gathers at once)
    largest_expert_module: int  # params of one layer's experts (all E; divide by ep for one rank's share)
    # per module in forward order, its own parameters as (parameter id, numel, is expert); empty: the ZeRO-3 working
    # set is the largest module alone
    trace: tuple[tuple[tuple[int, int, bool], ...], ...] = ()

    @property
    def dense(self) -> int:
        return sum(self.dense_sizes)

    @property
    def experts(self) -> int:
        return sum(self.expert_sizes)

    @property
    def total(self) -> int:
        return self.dense + self.experts

    @classmethod
    def of(cls, config: ModelConfig) -> ParamInventory:
        """From a meta-device build: the module tree training uses."""
        sizes = module_sizes(config)
        dense: list[int] = []
        experts: list[int] = []
        for name, numel in sizes.params:
            (experts if component_of(name) == "experts" else dense).append(numel)
        largest_dense, largest_expert = 0, 0
        for name, own in sizes.modules:
            if name.endswith(".experts"):
                largest_expert = max(largest_expert, own)
            else:
                largest_dense = max(largest_dense, own)
        index = {name: (i, numel, component_of(name) == "experts") for i, (name, numel) in enumerate(sizes.params)}
        trace = tuple(tuple(index[name] for name in names) for names in sizes.owned if names)
        return cls(tuple(dense), tuple(experts), largest_dense, largest_expert, trace)


@dataclass(frozen=True)
class Layout:
    """How a run is laid out on the cluster; the bucket sizes are DeepSpeed's config keys (elements)."""

    zero_stage: int
    gpus: int
    gpus_per_node: int = 8
    expert_parallel_size: int = 1
    micro_batch_size: int = 1
    seq_len: int = 4096
    recompute: str = "none"  # activation checkpointing: none, full, attention or moe (TrainConfig.recompute)
    precision: str = "mixed_bf16"
    offload_optimizer: bool = False
    offload_param: bool = False
    offload_device: str = "cpu"  # where offloaded states live: host memory, or NVMe files (ZeRO-Infinity)
    reduce_bucket_size: int = 500_000_000
    prefetch_bucket_size: int = 50_000_000
    persistence_threshold: int = 100_000
    overlap_comm: bool | None = None  # None: DeepSpeed's default (on for ZeRO-3 only)
    attention_scores_stored: bool = False  # True for eager attention; SDPA/flash kernels recompute them
    sub_group_size: int = 1_000_000_000  # ZeRO-3 converts gradients to fp32 one sub-group at a time
    max_reuse_distance: int = 1_000_000_000  # ZeRO-3 keeps a parameter gathered if used again within this many
    zero_init: bool = True  # ZeRO-3 builds the model partitioned (deepspeed.zero.Init)
    device: str = "gpu"  # gpu, or cpu: the process cost runtime_bytes counts
    grad_accum: int = 1  # micro-batches per optimizer step: gradients then outlive a backward
    grad_accum_fp32: bool = False  # mixed_bf16 with accumulation at ZeRO 1-3: gradients summed in fp32
    hpz_partition_size: int = 1  # ZeRO++ hpZ: a secondary copy of the parameters sharded within each node
    routed_load: float = 0.0  # EP > 1: a measured rank load (MoESummary's expert_rank_load); 0: the plan's allowance

    @property
    def gradient_checkpointing(self) -> bool:
        return self.recompute != "none"

    @property
    def nodes(self) -> int:
        return max(1, self.gpus // self.gpus_per_node)

    @property
    def overlap(self) -> bool:
        return self.zero_stage == 3 if self.overlap_comm is None else self.overlap_comm


REDUCE_BUCKET_FLOOR = 1 << 22  # elements (16 MiB in fp32): a small model's gradients in one or a few collectives


def with_bucket_rules(layout: Layout, model: ModelConfig) -> Layout:
    """The bucket rules of Hugging Face's DeepSpeed integration ("auto"): scale with h², not fixed at 5e8; the
    gradient bucket is at least REDUCE_BUCKET_FLOOR elements, or the whole model where it is smaller. h² alone is
    16K elements at h128: the `debug` model's gradients took 32 collectives per step, and two ranks ran at 0.74x
    one process (0.92x in one bucket; benchmarks/scaling.py)."""
    h = model.hidden_size
    floor = min(REDUCE_BUCKET_FLOOR, count_parameters(model).total)
    return replace(
        layout,
        reduce_bucket_size=max(floor, h * h),
        prefetch_bucket_size=int(0.9 * h * h),
        persistence_threshold=10 * h,
    )
