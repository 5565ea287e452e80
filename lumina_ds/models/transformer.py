"""Decoder-only MoE transformer: embedding, N x (RMSNorm, GQA attention, RMSNorm, SwiGLU or MoE), norm, LM head."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, TypedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lumina_ds.batch import IGNORE_INDEX
from lumina_ds.models.attention import (
    Attention,
    DocumentMask,
    LayerKVCache,
    build_document_mask,
    resolve_backend,
    window_band,
)
from lumina_ds.models.layers import RMSNorm, RotaryEmbedding, SwiGLU
from lumina_ds.models.loss import LMHead
from lumina_ds.models.moe import GroupedExperts, MoEBlock, RouterLogitsCollector, router_statistics

if TYPE_CHECKING:
    from lumina_ds.models.config import ModelConfig


RESIDUAL_OUTPUTS = ("o_proj", "w2")  # the projections that write into the residual stream
# what torch's module constructors and our init_module draw weights with
INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "zeros_", "ones_")


@contextlib.contextmanager
def _initialisers_skipped() -> Iterator[None]:
    saved = {name: getattr(nn.init, name) for name in INITIALISERS}
    for name in INITIALISERS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, initialiser in saved.items():
            setattr(nn.init, name, initialiser)


def meta_transformer(config: ModelConfig) -> Transformer:
    """The model's module tree on the meta device, for its shapes and sizes: nothing is allocated, and its weights are
    not initialised (there is nothing to draw into, and torch runs every initialiser on meta through Python)."""
    with torch.device("meta"), _initialisers_skipped():
        return Transformer(config)


def residual_output_std(config: ModelConfig, name: str) -> float:
    """The std of the residual-branch output projections in module `name` (layers.<i>...) under config.init_scheme.

    normal: init_std, as transformers' Llama/Mixtral. scaled: init_std / sqrt(2 * num_layers) (GPT-2, Megatron), so
    the residual stream's variance stays bounded with depth. depth: init_std / sqrt(2 * (i + 1)) for layer i
    (torchtitan's depth_init), so early layers start larger than under scaled.
    """
    std, scheme = config.init_std, config.init_scheme
    if scheme == "normal":
        return std
    if scheme == "scaled":
        return std / math.sqrt(2 * config.num_layers)
    assert scheme == "depth", scheme
    parts = name.split(".")
    if len(parts) < 2 or parts[0] != "layers":
        return std  # outside the blocks nothing writes into the residual stream
    return std / math.sqrt(2 * (int(parts[1]) + 1))


class ModelOutput(TypedDict, total=False):
    """A dict (not a dataclass) so DeepSpeed's ZeRO-3 hooks can walk the tensors in it.

    `metrics` is what the trainer logs without knowing what it is: floating-point tensors are averaged over
    micro-batches and ranks (element-wise), integer tensors (counters) are summed. This model reports `aux_loss` and
    `z_loss` (unweighted means over MoE layers), `router_entropy` [num_moe_layers] (mean routing entropy, nats),
    `expert_counts` [num_moe_layers, E] (tokens per expert in this forward) and, where a capacity limit drops routes
    (the native DeepSpeed layer), `tokens_dropped` [num_moe_layers].
    """

    logits: torch.Tensor  # [B, S, V]; absent when training with labels (the loss is chunked, see models/loss.py)
    loss: torch.Tensor  # lm_loss + weighted extra losses: what backward runs on
    lm_loss: torch.Tensor  # mean cross-entropy over target tokens
    num_targets: torch.Tensor  # number of target tokens in the batch
    metrics: dict[str, torch.Tensor]


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        moe = config.moe
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = Attention(
            hidden_size=config.hidden_size,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            backend=config.attention_backend,
            head_dim=config.head_dim,
            qkv_bias=config.attention_bias,
            qk_norm=config.qk_norm,
            norm_eps=config.rms_norm_eps,
            window=config.layer_window(layer_idx),
        )
        self.ffn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn: nn.Module
        if moe.is_moe_layer(layer_idx):
            self.ffn = MoEBlock(
                hidden_size=config.hidden_size,
                num_experts=moe.num_experts,
                top_k=moe.top_k,
                intermediate_size=moe.expert_intermediate_size,
                shared_intermediate_size=moe.shared_intermediate_size * moe.num_shared_experts,
                shared_expert_gate=moe.shared_expert_gate,
                norm_topk_prob=moe.norm_topk_prob,
            )
        else:
            self.ffn = SwiGLU(config.hidden_size, config.intermediate_size)

        self.recompute = "none"  # attention or moe: that sub-block is recomputed in backward (set_recompute)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: DocumentMask | None = None,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        recompute = self.recompute if self.training and kv_cache is None else "none"
        if recompute == "attention":  # non-reentrant: ZeRO-3 gathers the parameters again in the recompute
            x = x + checkpoint(self.attention, x, rope, mask, use_reentrant=False)
        else:
            x = x + self.attention(x, rope, mask, kv_cache)  # [B, S, H]
        if recompute == "moe":  # self.ffn is looked up per call: whatever AutoEP or the native layer put there
            return x + checkpoint(self.feed_forward, x, use_reentrant=False)
        return x + self.feed_forward(x)  # [B, S, H]

    def attention(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: DocumentMask | None = None,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        """The attention sub-block's residual branch: norm, then attention."""
        return self.attn(self.attn_norm(x), rope, mask=mask, kv_cache=kv_cache)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The FFN (MoE or dense) sub-block's residual branch: norm, then the FFN."""
        return self.ffn(self.ffn_norm(x))

    def compile_regions(self) -> None:
        """torch.compile what has static shapes: norm + attention, and norm + FFN where the FFN is dense.

        An MoE layer's FFN sub-block stays eager: expert dispatch sizes depend on the routing (graph breaks, and
        torch._grouped_mm has no fp32 fake-tensor kernel on CPU) and DeepSpeed may replace the block. Instance
        attributes shadow the methods, so parameter names (and checkpoints) are unchanged; dynamo shares one graph
        per region across the blocks.
        """
        self.attention = torch.compile(self.attention)  # type: ignore[method-assign]
        if isinstance(self.ffn, SwiGLU):
            self.feed_forward = torch.compile(self.feed_forward)  # type: ignore[method-assign]


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        config.validate()  # E002 for an inconsistent config, before any parameter is allocated
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rope = RotaryEmbedding(config.head_dim, theta=config.rope_theta, scaling=config.rope_scaling)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.recompute = "none"  # none, full, attention or moe: what backward recomputes (set_recompute)
        self.router_logits = RouterLogitsCollector()
        self.router_logits.attach([m.gate for m in self.modules() if isinstance(m, MoEBlock)])
        self.reset_parameters()

    def set_recompute(self, mode: str) -> None:
        """full: each block is recomputed in backward; attention / moe: only that sub-block of each block; none."""
        assert mode in ("none", "full", "attention", "moe"), mode
        self.recompute = mode
        for layer in self.blocks():
            layer.recompute = mode if mode in ("attention", "moe") else "none"

    def compile_blocks(self) -> None:
        """Regional torch.compile: each block's static-shape sub-blocks (Block.compile_regions), not the model."""
        for layer in self.blocks():
            layer.compile_regions()

    def blocks(self) -> list[Block]:
        return [layer for layer in self.layers if isinstance(layer, Block)]

    @property
    def num_moe_layers(self) -> int:
        return sum(self.config.moe.is_moe_layer(i) for i in range(self.config.num_layers))

    def reset_parameters(self) -> None:
        for name, module in self.named_modules():
            self.init_module(name, module)

    def init_module(self, name: str, module: nn.Module) -> None:
        """Initialise one submodule's own parameters (`name` as in named_modules()), drawing from torch's RNG."""
        std = self.config.init_std
        out_std = residual_output_std(self.config, name)  # residual-branch outputs (o_proj, w2): by init_scheme
        if isinstance(module, (nn.Linear, nn.Embedding)):
            last = name.rsplit(".", 1)[-1]
            nn.init.normal_(module.weight, std=out_std if last in RESIDUAL_OUTPUTS else std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, GroupedExperts):
            for pname, p in module.named_parameters():
                nn.init.normal_(p, std=out_std if pname in RESIDUAL_OUTPUTS else std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, RotaryEmbedding):
            module.reset_parameters()

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: list[LayerKVCache] | None = None,
    ) -> ModelOutput:
        """input_ids [B, S]; labels [B, S] already shifted (labels[t] is the target at position t).

        position_ids that restart at 0 mark packed documents: attention then stays within each document. attn_mask
        [B, 1, S, T] bool (True = attend) overrides that and always runs on SDPA.
        """
        B, S = input_ids.shape
        self.router_logits.clear()
        x = self.embed(input_ids)  # [B, S, H]
        masks = self._attention_masks(x, position_ids, attn_mask, cached=bool(kv_cache))
        if position_ids is None:
            start = kv_cache[0].length if kv_cache else 0
            position_ids = torch.arange(start, start + S, device=input_ids.device).expand(B, S)  # [B, S]
        rope = self.rope(position_ids)
        for i, layer in enumerate(self.layers):
            cache = kv_cache[i] if kv_cache else None
            mask = masks[self.config.layer_window(i)]
            if self.recompute == "full" and self.training and cache is None:
                x = checkpoint(layer, x, rope, mask, use_reentrant=False)
            else:
                x = layer(x, rope, mask, cache)
        hidden = self.norm(x)  # [B, S, H]
        if labels is not None and self.training and torch.is_grad_enabled():
            # the chunked loss: no [B, S, V] logits (nor an fp32 copy) live until backward, so none are returned
            out = self._losses(self.lm_head(hidden, labels, ignore_index=IGNORE_INDEX), labels)
        else:
            out = ModelOutput(logits=self.lm_head(hidden))  # [B, S, V]
            if labels is not None:
                summed = F.cross_entropy(
                    out["logits"].float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                )
                out.update(self._losses(summed, labels))
        self.router_logits.clear()  # the losses hold what they need; nothing outlives the forward
        return out

    def _attention_masks(
        self, x: torch.Tensor, position_ids: torch.Tensor | None, attn_mask: torch.Tensor | None, *, cached: bool
    ) -> dict[int, DocumentMask | None]:
        """The masks of this forward by sliding window size (0: full), each shared by its layers (none rebuilds it).

        Without documents a layer's window is applied where it attends (SDPA band, flash-attn window_size).
        """
        windows = {self.config.layer_window(i) for i in range(self.config.num_layers)}
        if attn_mask is not None:
            S, T = attn_mask.shape[-2:]
            return {w: DocumentMask("sdpa", dense=attn_mask & window_band(S, T, w, x.device) if w else attn_mask)
                    for w in windows}  # fmt: skip
        if cached:
            return dict.fromkeys(windows)  # incremental decoding: causal over the cache, one document per row
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        backend = resolve_backend(
            self.config.attention_backend, device=x.device, dtype=dtype, needs_grad=x.requires_grad
        )
        if position_ids is None:
            return dict.fromkeys(windows, DocumentMask(backend))
        if backend == "flash":  # the window is an argument of each layer's call: one mask serves every layer
            return dict.fromkeys(windows, build_document_mask(position_ids, backend))
        return {w: build_document_mask(position_ids, backend, window=w) for w in windows}

    def _losses(self, summed: torch.Tensor, labels: torch.Tensor) -> ModelOutput:
        """From the summed cross-entropy; nothing here reads a value back to the host (a GPU would stall on it)."""
        moe = self.config.moe
        num_targets = (labels != IGNORE_INDEX).sum()
        lm_loss = summed / num_targets.clamp_min(1)  # all targets masked: a zero that still has a graph
        zero = lm_loss.new_zeros(())
        stats = [router_statistics(r, moe.top_k) for r in self.router_logits.logits]  # per MoE layer
        aux = torch.stack([s[0] for s in stats]).mean() if stats else zero
        z = torch.stack([s[1] for s in stats]).mean() if stats else zero
        loss = lm_loss + moe.load_balancing_weight * aux + moe.router_z_loss_weight * z
        metrics = {"aux_loss": aux, "z_loss": z}  # with their graphs: a caller may backward through one
        if stats:
            metrics["expert_counts"] = torch.stack([s[2] for s in stats])
            metrics["router_entropy"] = torch.stack([s[3] for s in stats])
        if self.router_logits.dropped:
            metrics["tokens_dropped"] = torch.stack(self.router_logits.dropped)
        return ModelOutput(loss=loss, lm_loss=lm_loss, num_targets=num_targets, metrics=metrics)

    def new_kv_cache(self) -> list[LayerKVCache]:
        return [LayerKVCache() for _ in self.layers]
