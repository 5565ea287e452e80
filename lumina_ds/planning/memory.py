"""Per-GPU memory model: model states under ZeRO 0-3 with expert parallelism and offload, activations, buffers.

Pure arithmetic on a meta-device build (nothing is allocated). Model states follow what DeepSpeed 0.19.8 holds:

- ZeRO shards non-expert ("dense") parameters over all ranks and expert parameters over the expert-data-parallel
  group (world / ep) after expert parallelism gave each rank 1/ep of the experts. Either way every rank owns
  (dense + experts) / world of the sharded states.
- Mixed precision (mixed_bf16, mixed_fp16, fp16): 16-bit params (2) and grads (2), plus for the optimizer an fp32
  master copy (4), an fp32 gradient partition (4) and Adam's m and v (8): 2 + 2 + 16 bytes/param, the "18" of
  DeepSpeed's estimators being 2 (16-bit grads) + 16 once gradients are sharded. Pure bf16 keeps master, master
  grads and Adam states in bf16 (2 + 2 + 8). fp32 keeps 4-byte params and grads; ZeRO >= 1 still clones an fp32
  master partition (4) and flattens an fp32 gradient partition (4); ZeRO-0 fp32 is plain torch AdamW (4 + 4 + 8).
- ZeRO-3 keeps parameters below the persistence threshold whole on every rank, and gathers one module at a time:
  the largest module's 16-bit params and grads are live at once (the `4 * largest_layer_params` of DeepSpeed's
  ZeRO-3 estimator), plus the prefetch bucket. Its optimizer converts the 16-bit gradient partition to fp32 one
  sub-group (<= 1e9 elements) at a time, so ZeRO-3 holds 2 + 2 + 12 bytes/param plus 4 per sub-group element
  (DeepSpeed's ZeRO-3 estimator counts 18 bytes/param and leaves out the 16-bit gradient partition).

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"):
attention + norms store 15·sbh bytes at 16 bits plus 5·a·s²·b when attention scores are materialised (our SDPA
kernels do not store them on GPU); the feed-forward term is counted for our SwiGLU/MoE layers instead of their
19·sbh GELU MLP. With full recompute each layer keeps only its 2·sbh-byte input, plus one layer's activations
while it is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from lumina_ds.errors import ConfigError
from lumina_ds.models.config import ModelConfig
from lumina_ds.models.counting import component_of, count_parameters, module_sizes
from lumina_ds.models.loss import chunk_tokens_for

GIB = 1024**3
HOST_BUFFER_FACTOR = 1.5  # DeepSpeed's estimators' additional_buffer_factor for host memory (pinned buffers)
FRAGMENTATION_MARGIN = 0.08  # caching-allocator fragmentation on top of everything counted
GPU_RUNTIME_OVERHEAD = 2.0 * GIB  # CUDA context, NCCL communicators, cuBLAS workspaces (not in torch's allocator)
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
        return cls(tuple(dense), tuple(experts), largest_dense, largest_expert)


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
    zero_init: bool = True  # ZeRO-3 builds the model partitioned (deepspeed.zero.Init)
    gpu_runtime_overhead: float = GPU_RUNTIME_OVERHEAD
    grad_accum_fp32: bool = False  # mixed_bf16 with accumulation at ZeRO 1-3: gradients summed in fp32

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


def zero3_live_elements(inv: ParamInventory, layout: Layout) -> float:
    """Parameters gathered at once under ZeRO-3: the largest module (experts as this rank holds them)."""
    return max(inv.largest_dense_module, inv.largest_expert_module / layout.expert_parallel_size)


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
    live = zero3_live_elements(inv, layout) * (b.param + b.grad) + layout.prefetch_bucket_size * b.param
    return float(buckets + live)


def ffn_elements_per_token(config: ModelConfig, *, moe_layer: bool, capacity_factor: float) -> float:
    """Stored feed-forward activations per token: SwiGLU keeps its input, w1 and w3 outputs, silu and product.

    A MoE layer adds fp32 router logits and probabilities, and per routed copy (top_k, times the capacity
    allowance for uneven routing) the dispatched token, the expert's SwiGLU tensors and the weighted output.
    """
    h = config.hidden_size
    if not moe_layer:
        return h + 4 * config.intermediate_size
    moe = config.moe
    routed = moe.top_k * capacity_factor * (3 * h + 4 * moe.expert_intermediate_size)
    shared = 4 * moe.shared_intermediate_size * moe.num_shared_experts
    return h + 2 * moe.num_experts * 2 + routed + shared  # router logits + probs in fp32 = 2 x 16-bit each


def attention_subblock_bytes(config: ModelConfig, layout: Layout) -> float:
    """The attention sub-block's saved tensors: Korthikanti's 11sbh (+5as^2b eager scores) and its input norm's 2sbh."""
    b = precision_bytes(layout.precision, layout.zero_stage)
    sb = layout.seq_len * layout.micro_batch_size
    scale = b.act / 2  # Korthikanti's constants are bytes at 16 bits
    attention = 13 * sb * config.hidden_size * scale
    if layout.attention_scores_stored:
        attention += 5 * config.num_heads * layout.seq_len * sb * scale
    return attention


def ffn_subblock_bytes(config: ModelConfig, layout: Layout, *, moe_layer: bool) -> float:
    """The FFN (MoE or dense) sub-block's saved tensors: its input norm's 2sbh and our SwiGLU/MoE terms."""
    b = precision_bytes(layout.precision, layout.zero_stage)
    sb = layout.seq_len * layout.micro_batch_size
    capacity = max(1.0, config.moe.capacity_factor)
    ffn = ffn_elements_per_token(config, moe_layer=moe_layer, capacity_factor=capacity) * sb * b.act
    return 2 * sb * config.hidden_size * b.act / 2 + ffn


def layer_activation_bytes(config: ModelConfig, layout: Layout, *, moe_layer: bool) -> float:
    """One layer without recompute: Korthikanti's attention + norm terms, our SwiGLU/MoE feed-forward."""
    return attention_subblock_bytes(config, layout) + ffn_subblock_bytes(config, layout, moe_layer=moe_layer)


def stored_layer_bytes(config: ModelConfig, layout: Layout, *, moe_layer: bool) -> float:
    """What one layer holds from its forward to its backward under `layout.recompute`.

    A checkpointed (sub-)block keeps only its input, the [B, S, H] residual stream; the other sub-block keeps all.
    """
    b = precision_bytes(layout.precision, layout.zero_stage)
    checkpoint_input = layout.seq_len * layout.micro_batch_size * config.hidden_size * b.act
    attention = attention_subblock_bytes(config, layout)
    ffn = ffn_subblock_bytes(config, layout, moe_layer=moe_layer)
    mode = layout.recompute
    assert mode in ("none", "full", "attention", "moe"), mode
    if mode == "full":
        return checkpoint_input
    if mode == "attention":
        return checkpoint_input + ffn
    if mode == "moe":
        return attention + checkpoint_input
    return attention + ffn


def recompute_peak_bytes(config: ModelConfig, layout: Layout, *, moe_layer: bool) -> float:
    """What one recompute adds in backward over what the forward left stored, one (sub-)block at a time.

    Backward reaches a block's FFN before its attention: under attention recompute the FFN's stored tensors are
    freed before the attention sub-block is materialised again (measured on CPU, tests/planning).
    """
    mode = layout.recompute
    if mode == "full":
        return layer_activation_bytes(config, layout, moe_layer=moe_layer)
    if mode == "attention":
        freed = ffn_subblock_bytes(config, layout, moe_layer=moe_layer)
        return max(0.0, attention_subblock_bytes(config, layout) - freed)
    if mode == "moe":
        return ffn_subblock_bytes(config, layout, moe_layer=moe_layer)
    return 0.0


def chunked_loss_bytes(config: ModelConfig, *, tokens: int, act: int) -> float:
    """The LM head's loss in training (models/loss.py): one chunk's logits, their fp32 copy and gradient, and the
    gradients it keeps for backward (hidden states at `act` bytes, the head's weight in fp32)."""
    chunk = min(tokens, chunk_tokens_for(config.vocab_size))
    chunk_logits = chunk * config.vocab_size * (2 * act + 4)  # bf16 logits, fp32 copy, bf16 gradient
    return chunk_logits + tokens * config.hidden_size * act + config.vocab_size * config.hidden_size * 4


def activation_bytes(config: ModelConfig, layout: Layout) -> dict[str, float]:
    """Stored activations of one micro-batch, logits and cross-entropy, MoE all-to-all buffers."""
    b = precision_bytes(layout.precision, layout.zero_stage)
    s, mb, h = layout.seq_len, layout.micro_batch_size, config.hidden_size
    moe_layers = [config.moe.is_moe_layer(i) for i in range(config.num_layers)]
    stored = sum(stored_layer_bytes(config, layout, moe_layer=m) for m in moe_layers)
    stored += max(recompute_peak_bytes(config, layout, moe_layer=m) for m in moe_layers)
    if config.attention_backend == "sdpa":
        # the dense document mask, bool [B, 1, S, S], and the bias SDPA turns it into in every layer on a GPU, saved
        # for backward (when attention is recomputed only the layer being recomputed holds one); auto runs flash-attn
        # or flex there, whose masks are cu_seqlens or a BlockMask of (S/128)^2 blocks
        layers_holding_bias = 1 if layout.recompute in ("full", "attention") else config.num_layers
        stored += mb * s * s * (1 + layers_holding_bias * b.act)
    logits = chunked_loss_bytes(config, tokens=mb * s, act=b.act)
    dispatch = 0.0
    if any(moe_layers) and layout.expert_parallel_size > 1:  # AutoEP all-to-all send + receive, one layer at a time
        dispatch = 2 * config.moe.top_k * max(1.0, config.moe.capacity_factor) * s * mb * h * b.act
    return {"activations": float(stored), "logits": float(logits), "moe_dispatch": float(dispatch),
            "router": router_kept_bytes(config, layout)}  # fmt: skip


def router_kept_bytes(config: ModelConfig, layout: Layout) -> float:
    """Every MoE layer's fp32 router logits and softmax, which the router losses hold from the layer's forward to the
    end of the step (training/engine.py's router hooks), outside any recompute: with the FFN recomputed (full, moe)
    they are not among its stored tensors, yet stay (without recompute ffn_elements_per_token counts them)."""
    if layout.recompute not in ("full", "moe"):
        return 0.0
    moe_layers = sum(config.moe.is_moe_layer(i) for i in range(config.num_layers))
    return float(moe_layers * layout.micro_batch_size * layout.seq_len * config.moe.num_experts * 4 * 2)


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
    b = precision_bytes(precision, max(zero_stage, 1) if precision == "bf16" else zero_stage)
    return float(inv.total * (2 * b.param + b.master + b.optim))


def estimate_memory(config: ModelConfig, layout: Layout, inventory: ParamInventory | None = None) -> MemoryEstimate:
    """Per-GPU and per-node bytes of one training configuration."""
    inv = inventory or ParamInventory.of(config)
    gpu = model_state_bytes(inv, layout)
    gpu.update(activation_bytes(config, layout))
    gpu["comm_buffers"] = comm_buffer_bytes(inv, layout)
    gpu["fragmentation"] = FRAGMENTATION_MARGIN * sum(gpu.values())
    gpu["runtime"] = layout.gpu_runtime_overhead
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
