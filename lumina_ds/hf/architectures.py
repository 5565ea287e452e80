"""The Hugging Face architectures lumina-ds imports and exports exactly: config.json <-> ModelConfig.

Each entry mirrors transformers 5.24's modeling code for its class: a key a config.json leaves out takes that class's
default (tests/hf checks the table against transformers), an option that changes the model's function and that
lumina-ds cannot reproduce is refused with E005, never approximated. Training-only settings (router jitter, dropout)
do not change the function: they are accepted and not applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lumina_ds.errors import ConfigError
from lumina_ds.hf.common import HFConfigReader, refuse
from lumina_ds.hf.rope import rope_from_hf, rope_to_hf
from lumina_ds.hf.windows import window_from_hf, window_reason, window_to_hf
from lumina_ds.models.config import ModelConfig, MoEConfig

TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class ArchSpec:
    """One supported transformers class: how its config.json reads and which of our options it can carry."""

    name: str  # the `architectures` entry, e.g. "MixtralForCausalLM"
    model_type: str
    moe: str  # "" (dense), "mixtral" (block_sparse_moe.experts.N.w1/w2/w3) or "qwen" (mlp.experts.N.*_proj)
    qk_norm: str  # as ModelConfig.qk_norm
    qkv_bias: str  # "never", "always" (Qwen2) or "option" (Qwen2-MoE's qkv_bias)
    window: str  # sliding-window rule, see lumina_ds.hf.windows
    defaults: Mapping[str, Any]  # transformers 5.24's class defaults for keys a config.json may leave out
    supports: str  # for the README and E005 messages
    refuses: str = ""


def _defaults(**arch: Any) -> dict[str, Any]:
    common = {"tie_word_embeddings": False, "hidden_act": "silu", "rope_theta": 10000.0, "initializer_range": 0.02}
    return {**common, **arch}


QWEN_WINDOW = {"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28}
QWEN_MOE = {"decoder_sparse_step": 1, "norm_topk_prob": False, "mlp_only_layers": [], "router_aux_loss_coef": 0.001}
NO_O_BIAS = "attention_bias (it puts a bias on o_proj too)"
SUPPORTED: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec(
            "MixtralForCausalLM", "mixtral", "mixtral", "none", "never", "all",
            _defaults(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=None, max_position_embeddings=131072,
                      rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, num_local_experts=8,
                      num_experts_per_tok=2, router_aux_loss_coef=0.001),
            "top-k renormalised routing, sliding window, head_dim, RoPE scaling, tied embeddings",
        ),
        ArchSpec(
            "Qwen3MoeForCausalLM", "qwen3_moe", "qwen", "head", "never", "all_if_used",
            _defaults(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=32768,
                      rms_norm_eps=1e-6, attention_bias=False, num_experts=128, num_experts_per_tok=8,
                      moe_intermediate_size=768, **QWEN_WINDOW, **QWEN_MOE),
            "q/k RMSNorm per head, norm_topk_prob on/off, mlp_only_layers, decoder_sparse_step, sliding window, "
            "head_dim, RoPE scaling, tied embeddings",
            NO_O_BIAS,
        ),
        ArchSpec(
            "Qwen2MoeForCausalLM", "qwen2_moe", "qwen", "none", "option", "even_below",
            _defaults(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=32768,
                      rms_norm_eps=1e-6, qkv_bias=True, num_experts=60, num_experts_per_tok=4,
                      moe_intermediate_size=1408, shared_expert_intermediate_size=5632, **QWEN_WINDOW, **QWEN_MOE),
            "sigmoid-gated shared expert, q/k/v bias, norm_topk_prob on/off, mlp_only_layers, decoder_sparse_step, "
            "sliding window (its layer_types), head_dim, RoPE scaling, tied embeddings",
            "shared_expert_intermediate_size 0",
        ),
        ArchSpec(
            "OlmoeForCausalLM", "olmoe", "qwen", "projection", "never", "none",
            _defaults(vocab_size=50304, hidden_size=2048, intermediate_size=2048, num_hidden_layers=16,
                      num_attention_heads=16, num_key_value_heads=None, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, attention_bias=False, clip_qkv=None, num_experts=64,
                      num_experts_per_tok=8, norm_topk_prob=False, router_aux_loss_coef=0.01),
            "q/k RMSNorm over the whole projection, norm_topk_prob on/off, head_dim, RoPE scaling, tied embeddings",
            f"clip_qkv, {NO_O_BIAS}",
        ),
        ArchSpec(
            "LlamaForCausalLM", "llama", "", "none", "never", "none",
            _defaults(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=None, head_dim=None, max_position_embeddings=2048,
                      rms_norm_eps=1e-6, attention_bias=False, mlp_bias=False),
            "head_dim, RoPE scaling (linear, dynamic, yarn, llama3), tied embeddings",
            f"mlp_bias, {NO_O_BIAS}",
        ),
        ArchSpec(
            "MistralForCausalLM", "mistral", "", "none", "never", "all",
            _defaults(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=None, max_position_embeddings=131072,
                      rms_norm_eps=1e-6, sliding_window=4096),
            "sliding window, head_dim, RoPE scaling, tied embeddings",
        ),
        ArchSpec(
            "Qwen2ForCausalLM", "qwen2", "", "none", "always", "from_layer",
            _defaults(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
                      rms_norm_eps=1e-6, **QWEN_WINDOW),
            "q/k/v bias, sliding window (max_window_layers / layer_types), head_dim, RoPE scaling, tied embeddings",
        ),
        ArchSpec(
            "Qwen3ForCausalLM", "qwen3", "", "head", "never", "from_layer",
            _defaults(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, head_dim=128, max_position_embeddings=32768,
                      rms_norm_eps=1e-6, attention_bias=False, **QWEN_WINDOW),
            "q/k RMSNorm per head, sliding window (max_window_layers / layer_types), head_dim, RoPE scaling, "
            "tied embeddings",
            NO_O_BIAS,
        ),
    )
}  # fmt: skip
AUTO_ORDER = tuple(SUPPORTED)  # export --arch auto: the first that represents the model exactly
ALWAYS_REFUSED = "hidden_act other than silu, quantized checkpoints, partial rotary, RoPE types other than these"


@dataclass(frozen=True)
class HFImport:
    """A Hugging Face config.json as lumina-ds sees it."""

    model: ModelConfig
    arch: str  # a key of SUPPORTED
    token_ids: dict[str, Any] = field(default_factory=dict)  # bos/eos/pad ids the config.json states


def supported_list() -> str:
    return ", ".join(SUPPORTED)


def architecture_of(hf_config: Mapping[str, Any]) -> str:
    """The config's supported architecture (its `architectures` entry, else its model_type), or E005."""
    names = list(hf_config.get("architectures") or [])
    if not names:
        by_type = {spec.model_type: name for name, spec in SUPPORTED.items()}
        names = [by_type.get(str(hf_config.get("model_type")), f"model_type {hf_config.get('model_type')!r}")]
    if names[0] not in SUPPORTED:
        raise ConfigError(
            "E005",
            f"architecture {names[0]} is not supported",
            f"lumina-ds imports and exports exactly: {supported_list()} (README: Supported Hugging Face architectures)",
        )
    model_type = hf_config.get("model_type", SUPPORTED[names[0]].model_type)
    if model_type != SUPPORTED[names[0]].model_type:  # transformers builds by model_type, vLLM by architectures
        raise refuse(
            names[0],
            f"model_type {model_type!r} is not this architecture's ({SUPPORTED[names[0]].model_type!r}): "
            "transformers and other readers would build different models",
            "make config.json's architectures and model_type agree",
        )
    return names[0]


def model_config_from_hf(hf_config: Mapping[str, Any]) -> HFImport:
    """The ModelConfig whose model computes what transformers computes from this config.json, or E005."""
    arch = architecture_of(hf_config)
    spec = SUPPORTED[arch]
    c = HFConfigReader(hf_config, arch=arch, defaults=spec.defaults)
    _refuse_options(c, spec)
    heads = c("num_attention_heads")
    kv_heads = c("num_key_value_heads") or heads
    head_dim = c("head_dim") if "head_dim" in spec.defaults or "head_dim" in hf_config else None
    hidden, layers, max_positions = c("hidden_size"), c("num_hidden_layers"), c("max_position_embeddings")
    theta, scaling = rope_from_hf(hf_config, arch=arch, default_theta=c("rope_theta"), max_positions=max_positions)
    window, window_layers = window_from_hf(c, spec.window, layers)
    moe = _moe_from_hf(c, spec, layers)
    model = ModelConfig(
        vocab_size=c("vocab_size"), hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
        intermediate_size=c("intermediate_size"), max_seq_len=max_positions, rope_theta=theta,
        rms_norm_eps=float(c("rms_norm_eps")), tie_embeddings=bool(c("tie_word_embeddings")),
        init_std=float(c("initializer_range")),
        attention_head_dim=head_dim if head_dim and (hidden % heads or head_dim != hidden // heads) else 0,
        attention_bias=spec.qkv_bias == "always" or (spec.qkv_bias == "option" and bool(c("qkv_bias"))),
        qk_norm=spec.qk_norm, sliding_window=window, sliding_window_layers=window_layers,
        rope_scaling=scaling, moe=moe,
    )  # fmt: skip
    _validate(model, arch)
    return HFImport(model=model, arch=arch, token_ids={k: hf_config[k] for k in TOKEN_ID_KEYS if k in hf_config})


def _refuse_options(c: HFConfigReader, spec: ArchSpec) -> None:
    """Options that change the function and that our model does not have."""
    c.require("hidden_act", ("silu",), "SwiGLU with SiLU is the only activation")
    if c.hf.get("quantization_config"):
        raise refuse(spec.name, "quantized checkpoints are not supported", "import the unquantized weights")
    if "attention_bias" in spec.defaults:
        c.require("attention_bias", (False,), "q/k/v biases without an o_proj bias are (Qwen2 / Qwen2-MoE)")
    if "mlp_bias" in spec.defaults:
        c.require("mlp_bias", (False,))
    if "clip_qkv" in spec.defaults:
        c.require("clip_qkv", (None,))


def _moe_from_hf(c: HFConfigReader, spec: ArchSpec, layers: int) -> MoEConfig:
    if not spec.moe:
        return MoEConfig(num_experts=0)
    experts = c("num_local_experts", "num_experts") if spec.moe == "mixtral" else c("num_experts", "num_local_experts")
    moe = MoEConfig(
        num_experts=experts,
        top_k=c("num_experts_per_tok"),
        expert_intermediate_size=c("moe_intermediate_size" if "moe_intermediate_size" in spec.defaults else
                                   "intermediate_size"),
        norm_topk_prob=spec.moe == "mixtral" or bool(c("norm_topk_prob")),
        load_balancing_weight=float(c("router_aux_loss_coef")),
        router_z_loss_weight=float(c.hf.get("router_z_loss_coef") or 0.0),  # the transformers classes have none
    )  # fmt: skip
    if "decoder_sparse_step" in spec.defaults:
        moe.moe_every = c("decoder_sparse_step")
        moe.dense_layers = sorted(i for i in (c("mlp_only_layers") or []) if 0 <= i < layers)
    if "shared_expert_intermediate_size" in spec.defaults:
        shared = c("shared_expert_intermediate_size")
        if not shared:
            raise refuse(spec.name, "shared_expert_intermediate_size 0 is not supported")
        moe.num_shared_experts, moe.shared_intermediate_size, moe.shared_expert_gate = 1, shared, True
    if experts < 1 or moe.moe_every < 1:
        raise refuse(spec.name, f"num_experts={experts}, decoder_sparse_step={moe.moe_every}: no MoE layer to build")
    return moe


def _validate(model: ModelConfig, arch: str) -> None:
    try:
        model.validate()
    except ConfigError as exc:
        raise refuse(arch, f"the config.json does not make a valid model: {exc.message}", exc.hint) from exc


def hf_config_from_model(
    config: ModelConfig, *, arch: str = "auto", torch_dtype: str = "float32", token_ids: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A config.json that transformers loads into a model computing exactly what ours computes, or E005.

    arch "auto" takes the first of SUPPORTED that can; a named one that cannot says why.
    """
    spec = SUPPORTED[export_architecture(config, arch=arch)]
    out = _base_to_hf(config, spec, torch_dtype)
    out.update(window_to_hf(config, spec.window))
    out.update(_moe_to_hf(config, spec))
    out.update({key: value for key, value in (token_ids or {}).items() if key in TOKEN_ID_KEYS})
    return out


def export_architecture(config: ModelConfig, *, arch: str = "auto") -> str:
    """The architecture an export writes: `arch` if it represents the model exactly, for auto the first that does."""
    if arch != "auto" and arch not in SUPPORTED:
        raise ConfigError("E005", f"unknown export architecture {arch!r}", f"use auto or one of {supported_list()}")
    names = AUTO_ORDER if arch == "auto" else (arch,)
    reasons = {name: unrepresentable(config, SUPPORTED[name]) for name in names}
    fitting = [name for name in names if not reasons[name]]
    if not fitting:
        why = "; ".join(f"{name} cannot carry {', '.join(r)}" for name, r in reasons.items())
        raise ConfigError(
            "E005", f"no supported architecture represents this model exactly: {why}", f"supported: {supported_list()}"
        )
    return fitting[0]


def unrepresentable(config: ModelConfig, spec: ArchSpec) -> list[str]:
    """Why `spec` cannot carry this model exactly (empty: it can)."""
    moe, reasons = config.moe, []
    if bool(spec.moe) != moe.enabled:
        reasons.append("a MoE model" if moe.enabled else "a dense model")
    if config.qk_norm != spec.qk_norm:
        reasons.append(f"qk_norm {config.qk_norm!r} (it has {spec.qk_norm!r})")
    if spec.qkv_bias != "option" and config.attention_bias != (spec.qkv_bias == "always"):
        reasons.append(f"attention_bias {config.attention_bias} (it has {spec.qkv_bias} q/k/v bias)")
    if (window := window_reason(config, spec.window)) is not None:
        reasons.append(window)
    if moe.enabled and spec.moe:
        reasons.extend(_moe_reasons(moe, spec, config.num_layers))
    return reasons


def _moe_reasons(moe: MoEConfig, spec: ArchSpec, layers: int) -> list[str]:
    reasons = []
    # an ungated shared expert is written with a zero gate (sigmoid = 1/2) and its down_proj doubled: exact
    if "shared_expert_intermediate_size" in spec.defaults and moe.num_shared_experts != 1:
        reasons.append(f"{moe.num_shared_experts} shared experts (it has exactly one)")
    if moe.num_shared_experts and "shared_expert_intermediate_size" not in spec.defaults:
        reasons.append(f"{moe.num_shared_experts} shared expert(s)" + ("" if moe.shared_expert_gate else ", ungated"))
    if spec.moe == "mixtral" and not moe.norm_topk_prob:
        reasons.append("norm_topk_prob off (it renormalises)")
    all_moe = all(moe.is_moe_layer(i) for i in range(layers))
    if "decoder_sparse_step" not in spec.defaults and not all_moe:
        reasons.append("dense layers among the MoE layers")
    return reasons


def _base_to_hf(config: ModelConfig, spec: ArchSpec, torch_dtype: str) -> dict[str, Any]:
    rope = rope_to_hf(config.rope_theta, config.rope_scaling)
    dynamic = config.rope_scaling.type == "dynamic"  # its base length is transformers' max_position_embeddings
    out: dict[str, Any] = {
        "architectures": [spec.name], "model_type": spec.model_type, "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.rope_scaling.original_max_position_embeddings if dynamic
        else config.max_seq_len,
        "rms_norm_eps": config.rms_norm_eps, "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std, "attention_dropout": 0.0, "use_cache": True,
        "dtype": torch_dtype, "torch_dtype": torch_dtype, **rope,
    }  # fmt: skip
    if spec.qkv_bias == "option":
        out["qkv_bias"] = config.attention_bias
    for key in ("attention_bias", "mlp_bias"):
        if key in spec.defaults:
            out[key] = False
    if "clip_qkv" in spec.defaults:
        out["clip_qkv"] = None
    return out


def _moe_to_hf(config: ModelConfig, spec: ArchSpec) -> dict[str, Any]:
    moe = config.moe
    if not spec.moe:
        return {}
    out: dict[str, Any] = {
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": moe.load_balancing_weight,
        "output_router_logits": False,
        "num_local_experts" if spec.moe == "mixtral" else "num_experts": moe.num_experts,
    }
    if "moe_intermediate_size" in spec.defaults:
        out["moe_intermediate_size"] = moe.expert_intermediate_size
    else:  # Mixtral, OLMoE: intermediate_size is the experts' (they have no dense layer)
        out["intermediate_size"] = moe.expert_intermediate_size
    if "norm_topk_prob" in spec.defaults:
        out["norm_topk_prob"] = moe.norm_topk_prob
    if spec.moe == "mixtral":
        out["router_jitter_noise"] = 0.0
    if "decoder_sparse_step" in spec.defaults:
        dense = [i for i in range(config.num_layers) if not moe.is_moe_layer(i) and (i + 1) % moe.moe_every == 0]
        out.update(decoder_sparse_step=moe.moe_every, mlp_only_layers=dense)
    if "shared_expert_intermediate_size" in spec.defaults:
        out["shared_expert_intermediate_size"] = moe.shared_intermediate_size
    return out
