"""Activation memory of one micro-batch, after Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models"): attention + norms store 15·sbh bytes at 16 bits plus 5·a·s²·b when attention scores are
materialised (our SDPA kernels do not store them on GPU); the feed-forward term is counted for our SwiGLU/MoE layers
instead of their 19·sbh GELU MLP. With full recompute each layer keeps only its 2·sbh-byte input, plus one layer's
activations while it is recomputed.
"""

from __future__ import annotations

from lumina_ds.models.config import ModelConfig
from lumina_ds.models.loss import chunk_tokens_for
from lumina_ds.models.moe import DROPLESS_IMBALANCE, worst_rank_load
from lumina_ds.planning.memory_inputs import Layout, precision_bytes


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
