"""The model's own config, next to the model: the transformer and its Mixture-of-Experts layers. `Transformer(config)`
validates it and builds the model."""

from __future__ import annotations

from dataclasses import dataclass, field

from lumina_ds.errors import ConfigError
from lumina_ds.frozen import Freezable

# auto picks per forward (flash-attn, then flex_attention on CUDA; SDPA on CPU); an explicit one that cannot run is E003
ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "flex")
# RoPE frequency schemes, each computed as transformers' modeling_rope_utils does (lumina_ds.models.rope)
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
# query/key RMSNorm before RoPE: none, per head over head_dim (Qwen3), or over the whole projection (OLMoE)
QK_NORMS = ("none", "head", "projection")
# the std of the residual-branch outputs (o_proj, w2): normal = init_std (transformers), scaled = init_std/sqrt(2L),
# depth = init_std/sqrt(2(i+1)) for layer i (torchtitan); everything else is normal(init_std) in each. normal is the
# default: it learned fastest per token in benchmarks/learning.py (benchmarks/NOTES.md)
INIT_SCHEMES = ("normal", "scaled", "depth")


@dataclass
class RopeScalingConfig(Freezable):
    """RoPE frequency scaling as Hugging Face's `rope_parameters` state it; `type: default` is plain RoPE."""

    type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0
    # yarn / llama3: the pretraining context; dynamic: the length past which the base grows (HF max_position_embeddings)
    original_max_position_embeddings: int = 0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float = 0.0  # yarn: 0 = unset (as HF, which tests the value for truth)
    mscale_all_dim: float = 0.0  # yarn: 0 = unset
    attention_factor: float = 0.0  # yarn: scale of cos/sin; 0 = derived from factor (and mscale)
    truncate: bool = True  # yarn: round the correction range to whole dimensions

    def validate(self) -> None:
        if self.type not in ROPE_TYPES:
            raise ConfigError("E002", f"unknown rope_scaling type {self.type!r}", f"use one of {', '.join(ROPE_TYPES)}")
        if self.type == "default":
            return
        if self.factor <= 0 or (self.type != "linear" and self.original_max_position_embeddings <= 0):
            raise ConfigError(
                "E002",
                f"rope_scaling {self.type} needs factor > 0"
                + ("" if self.type == "linear" else " and original_max_position_embeddings > 0"),
            )
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError("E002", "rope_scaling llama3 needs high_freq_factor > low_freq_factor")


@dataclass
class MoEConfig(Freezable):
    """Routed experts; `num_experts == 0` gives a dense SwiGLU model."""

    num_experts: int = 8
    top_k: int = 2
    expert_intermediate_size: int = 512
    num_shared_experts: int = 0
    shared_intermediate_size: int = 0
    moe_every: int = 1  # MoE on every k-th layer (1 = all), dense SwiGLU on the others
    dense_layers: list[int] = field(default_factory=list)  # dense whatever moe_every says (HF mlp_only_layers)
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1 (Mixtral; Qwen-MoE/OLMoE: off)
    shared_expert_gate: bool = False  # scale the shared expert by sigmoid(Linear(H, 1)) (Qwen2-MoE)
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
        return self.enabled and layer_idx not in self.dense_layers and (layer_idx + 1) % self.moe_every == 0

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
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ConfigError("E002", "shared_expert_gate needs num_shared_experts > 0")
        if self.capacity_factor <= 0 or self.load_balancing_weight < 0 or self.router_z_loss_weight < 0:
            raise ConfigError("E002", "capacity_factor must be > 0 and loss weights >= 0")


@dataclass
class ModelConfig(Freezable):
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
    init_scheme: str = "normal"  # one of INIT_SCHEMES
    attention_backend: str = "auto"  # one of ATTENTION_BACKENDS
    attention_head_dim: int = 0  # 0: hidden_size // num_heads (HF's explicit head_dim, e.g. Qwen3)
    attention_bias: bool = False  # bias on the q/k/v projections (Qwen2); o_proj never has one
    qk_norm: str = "none"  # one of QK_NORMS
    sliding_window: int = 0  # > 0: a token attends to itself and the sliding_window - 1 tokens before it
    sliding_window_layers: list[int] | None = None  # the layers the window applies to; None: all of them
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden_size // self.num_heads

    def layer_window(self, layer_idx: int) -> int:
        """The sliding window of one layer, 0 for full causal attention."""
        if self.sliding_window_layers is not None and layer_idx not in self.sliding_window_layers:
            return 0
        return self.sliding_window

    def validate(self) -> None:
        if not self.attention_head_dim and self.hidden_size % self.num_heads:
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
        if self.init_scheme not in INIT_SCHEMES:
            raise ConfigError(
                "E002", f"unknown init_scheme {self.init_scheme!r}", f"use one of {', '.join(INIT_SCHEMES)}"
            )
        if self.qk_norm not in QK_NORMS:
            raise ConfigError("E002", f"unknown qk_norm {self.qk_norm!r}", f"use one of {', '.join(QK_NORMS)}")
        if self.attention_head_dim < 0 or self.sliding_window < 0:
            raise ConfigError("E002", "attention_head_dim and sliding_window must be >= 0")
        self.rope_scaling.validate()
        self.moe.validate()
