"""RoPE settings between a Hugging Face config.json (`rope_parameters`, or the older `rope_theta` + `rope_scaling`)
and RopeScalingConfig, resolved as transformers 5.x resolves them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lumina_ds.hf.common import refuse
from lumina_ds.models.config import ROPE_TYPES, RopeScalingConfig

# keys each scheme reads (transformers' _validate_*_rope_parameters); any other key would be ignored here, so it is
# refused rather than dropped
COMMON_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor", "original_max_position_embeddings"},  # transformers ignores the latter for dynamic
    "yarn": {
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    },
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}
LAYER_TYPE_KEYS = ("full_attention", "sliding_attention")  # rope_parameters nested by layer type


def rope_from_hf(
    hf: Mapping[str, Any], *, arch: str, default_theta: float, max_positions: int
) -> tuple[float, RopeScalingConfig]:
    """(rope_theta, scaling) of a config.json: `rope_scaling` wins over `rope_parameters`, as in transformers."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if any(key in params for key in LAYER_TYPE_KEYS):
        raise refuse(arch, "RoPE parameters per layer type are not supported", "one RoPE for every layer is")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise refuse(arch, f"rope type {kind!r} is not supported", f"supported: {', '.join(ROPE_TYPES)}")
    unknown = sorted(set(params) - COMMON_KEYS - ROPE_KEYS[kind])
    if unknown:
        raise refuse(arch, f"rope_parameters key(s) {unknown} are not supported for rope type {kind!r}")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise refuse(arch, f"partial_rotary_factor={partial} is not supported", "RoPE over the whole head is")
    theta = float(params.get("rope_theta", hf.get("rope_theta", default_theta)))
    return theta, _scaling(params, kind, hf=hf, arch=arch, max_positions=max_positions)


def _scaling(
    params: dict[str, Any], kind: str, *, hf: Mapping[str, Any], arch: str, max_positions: int
) -> RopeScalingConfig:
    if kind == "default":
        return RopeScalingConfig()
    if params.get("factor") is None:
        raise refuse(arch, f"rope type {kind!r} without a factor")
    original = max_positions  # dynamic: the length past which the base grows
    if kind in ("yarn", "llama3"):
        # a top-level original_max_position_embeddings overrides the rope's own (transformers' Phi-3 rule)
        stated = hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
        original = int(stated or max_positions)
    scaling = RopeScalingConfig(
        type=kind, factor=float(params["factor"]), original_max_position_embeddings=int(original)
    )
    if kind == "llama3":
        scaling.low_freq_factor = float(params["low_freq_factor"])
        scaling.high_freq_factor = float(params["high_freq_factor"])
    elif kind == "yarn":
        scaling.beta_fast = float(params.get("beta_fast") or 32)
        scaling.beta_slow = float(params.get("beta_slow") or 1)
        scaling.mscale = float(params.get("mscale") or 0.0)
        scaling.mscale_all_dim = float(params.get("mscale_all_dim") or 0.0)
        if params.get("attention_factor") is not None and params["attention_factor"] <= 0:
            raise refuse(arch, f"yarn attention_factor={params['attention_factor']} must be > 0")
        scaling.attention_factor = float(params.get("attention_factor") or 0.0)
        scaling.truncate = bool(params.get("truncate", True))
    scaling.validate()
    return scaling


def rope_to_hf(theta: float, scaling: RopeScalingConfig) -> dict[str, Any]:
    """config.json keys: `rope_parameters` (transformers 5) plus `rope_theta`/`rope_scaling` for older readers."""
    params: dict[str, Any] = {"rope_type": scaling.type, "rope_theta": theta}
    if scaling.type != "default":
        params["factor"] = scaling.factor
    if scaling.type in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = scaling.original_max_position_embeddings
    if scaling.type == "llama3":
        params.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor)
    if scaling.type == "yarn":
        params.update(beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow, truncate=scaling.truncate)
        optional = {"mscale": scaling.mscale, "mscale_all_dim": scaling.mscale_all_dim}
        optional["attention_factor"] = scaling.attention_factor
        params.update({key: value for key, value in optional.items() if value})
    legacy = None
    if scaling.type != "default":
        legacy = {key: value for key, value in params.items() if key != "rope_theta"}
        legacy["type"] = scaling.type
    return {"rope_parameters": params, "rope_theta": theta, "rope_scaling": legacy}
