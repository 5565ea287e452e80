"""Architecture configs: the transformer and its Mixture-of-Experts layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lumina_ds.errors import ConfigError

if TYPE_CHECKING:
    from lumina_ds.models.transformer import Transformer

# auto picks per forward (flash-attn, then flex_attention on CUDA; SDPA on CPU); an explicit one that cannot run is E003
ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "flex")


@dataclass
class MoEConfig:
    """Routed experts; `num_experts == 0` gives a dense SwiGLU model."""

    num_experts: int = 8
    top_k: int = 2
    expert_intermediate_size: int = 512
    num_shared_experts: int = 0
    shared_intermediate_size: int = 0
    moe_every: int = 1  # MoE on every k-th layer (1 = all), dense SwiGLU on the others
    capacity_factor: float = 1.25  # native backend only: AutoEP is dropless
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    drop_tokens: bool = True
    load_balancing_weight: float = 0.01
    router_z_loss_weight: float = 0.001

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.enabled and (layer_idx + 1) % self.moe_every == 0

    def validate(self) -> None:
        if not self.enabled:
            return
        if not 1 <= self.top_k <= min(8, self.num_experts):
            raise ConfigError(
                "E002",
                f"moe top_k={self.top_k} must be between 1 and min(8, num_experts={self.num_experts})",
                "lower --top-k or raise --num-experts",
            )
        if self.expert_intermediate_size <= 0 or self.moe_every < 1:
            raise ConfigError("E002", "expert_intermediate_size must be > 0 and moe_every >= 1")
        if self.num_shared_experts and self.shared_intermediate_size <= 0:
            raise ConfigError("E002", "shared experts need shared_intermediate_size > 0")
        if self.capacity_factor <= 0 or self.load_balancing_weight < 0 or self.router_z_loss_weight < 0:
            raise ConfigError("E002", "capacity_factor must be > 0 and loss weights >= 0")


@dataclass
class ModelConfig:
    """Decoder-only transformer: GQA attention with RoPE, RMSNorm, SwiGLU or MoE feed-forward."""

    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int = 512  # dense SwiGLU layers (when MoE is off or skipped on a layer)
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    attention_backend: str = "auto"  # one of ATTENTION_BACKENDS
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                "E002",
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}",
                "pick num_heads that divides hidden_size",
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                "E002",
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}",
                "grouped-query attention shares each KV head across num_heads/num_kv_heads query heads",
            )
        if self.head_dim % 2:
            raise ConfigError("E002", f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                "E002",
                f"unknown attention_backend {self.attention_backend!r}",
                f"use one of {', '.join(ATTENTION_BACKENDS)}",
            )
        if min(self.vocab_size, self.num_layers, self.max_seq_len, self.intermediate_size) <= 0:
            raise ConfigError("E002", "vocab_size, num_layers, max_seq_len and intermediate_size must be positive")
        self.moe.validate()

    def build(self) -> Transformer:
        from lumina_ds.models.transformer import Transformer

        self.validate()
        return Transformer(self)
