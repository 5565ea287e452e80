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
from lumina_ds.models.moe import DROPLESS_IMBALANCE, worst_rank_load

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


def ffn_elements_per_token(config: ModelConfig, *, moe_layer: bool, load: float) -> float:
    """Stored feed-forward activations per token: SwiGLU keeps its input, w1 and w3 outputs, silu and product.

    A MoE layer adds fp32 router logits and probabilities, and per routed copy (top_k, times `load`, the most
    copies a rank computes over the mean) the dispatched token, the expert's SwiGLU tensors and the weighted output.
    """
    h = config.hidden_size
    if not moe_layer:
        return h + 4 * config.intermediate_size
    moe = config.moe
    routed = moe.top_k * load * (3 * h + 4 * moe.expert_intermediate_size)
    shared = 4 * moe.shared_intermediate_size * moe.num_shared_experts
    return h + 2 * moe.num_experts * 2 + routed + shared  # router logits + probs in fp32 = 2 x 16-bit each


def routed_load(config: ModelConfig, layout: Layout) -> float:
    """Routed copies one rank computes, over top_k x its tokens. With every expert local (EP 1) exactly 1: the block
    gathers the top_k copies of each token, a capacity limit only drops some. Across ranks (AutoEP, dropless) a rank
    computes whatever its experts are sent: DROPLESS_IMBALANCE, or less where no routing can reach it."""
    ep = layout.expert_parallel_size
    if ep == 1 or not config.moe.enabled:
        return 1.0
    return layout.routed_load or min(DROPLESS_IMBALANCE, worst_rank_load(config.moe.num_experts, config.moe.top_k, ep))


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
    ffn = ffn_elements_per_token(config, moe_layer=moe_layer, load=routed_load(config, layout)) * sb * b.act
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
    """The LM head's loss in training (models/loss.py's ChunkBuffers): one chunk's logits in the weight's dtype and,
    for a 16-bit weight, their fp32 copy (the softmax and its gradient are computed in place), a 16-bit scratch for
    the head's weight gradient; and what backward receives: the hidden states' gradient at `act` bytes and the head
    weight's gradient summed in fp32."""
    chunk = min(tokens, chunk_tokens_for(config.vocab_size))
    vh = config.vocab_size * config.hidden_size
    scratch = chunk * config.vocab_size * (act + 4) + vh * act if act < 4 else chunk * config.vocab_size * act
    return scratch + tokens * config.hidden_size * act + vh * 4


def activation_bytes(config: ModelConfig, layout: Layout) -> dict[str, float]:
    """Stored activations of one micro-batch, logits and cross-entropy, MoE all-to-all buffers."""
    b = precision_bytes(layout.precision, layout.zero_stage)
    s, mb, h = layout.seq_len, layout.micro_batch_size, config.hidden_size
    moe_layers = [config.moe.is_moe_layer(i) for i in range(config.num_layers)]
    stored = sum(stored_layer_bytes(config, layout, moe_layer=m) for m in moe_layers)
    recompute = max(recompute_peak_bytes(config, layout, moe_layer=m) for m in moe_layers)
    if config.attention_backend == "sdpa":
        # the dense document mask, bool [B, 1, S, S], and the bias SDPA turns it into in every layer on a GPU, saved
        # for backward (when attention is recomputed only the layer being recomputed holds one); auto runs flash-attn
        # or flex there, whose masks are cu_seqlens or a BlockMask of (S/128)^2 blocks
        layers_holding_bias = 1 if layout.recompute in ("full", "attention") else config.num_layers
        stored += mb * s * s * (1 + layers_holding_bias * b.act)
    logits = chunked_loss_bytes(config, tokens=mb * s, act=b.act)
    dispatch = 0.0
    if any(moe_layers) and layout.expert_parallel_size > 1:  # AutoEP all-to-all send + receive, one layer at a time
        dispatch = (1 + routed_load(config, layout)) * config.moe.top_k * s * mb * h * b.act
    return {"activations": float(stored), "recompute": float(recompute), "logits": float(logits),
            "moe_dispatch": float(dispatch), "router": router_kept_bytes(config, layout)}  # fmt: skip


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
