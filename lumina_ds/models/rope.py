"""RoPE inverse frequencies with the scalings Hugging Face configs name (linear, dynamic NTK, YaRN, Llama 3).

Each follows transformers' `modeling_rope_utils` operation for operation (same dtypes, same order), so that an
imported model's angles are the ones it was trained with, to the last bit where the arithmetic allows.
"""

from __future__ import annotations

import math

import torch

from lumina_ds.models.config import RopeScalingConfig


def default_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """[head_dim / 2] fp32: theta^(-2i/d)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


def scaled_inv_freq(
    head_dim: int, theta: float, scaling: RopeScalingConfig, device: torch.device | None = None
) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2] fp32, factor on cos/sin) of a static scheme; dynamic at its base length."""
    kind = scaling.type
    if kind == "linear":
        return default_inv_freq(head_dim, theta, device) / scaling.factor, 1.0
    if kind == "llama3":
        return _llama3(head_dim, theta, scaling, device), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling, device)
    if kind == "dynamic":
        return dynamic_inv_freq(head_dim, theta, scaling, scaling.original_max_position_embeddings, device), 1.0
    assert kind == "default", kind
    return default_inv_freq(head_dim, theta, device), 1.0


def dynamic_inv_freq(
    head_dim: int,
    theta: float,
    scaling: RopeScalingConfig,
    seq_len: int | torch.Tensor,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Dynamic NTK: the base grows with the sequence length once it passes original_max_position_embeddings.

    seq_len is a Python int at the base length and a 0-d tensor past it, as in transformers (the arithmetic differs
    in its last bits between the two, and each must match its counterpart).
    """
    base_len = scaling.original_max_position_embeddings
    if isinstance(seq_len, torch.Tensor):
        seq_len = torch.maximum(seq_len, torch.tensor(base_len, dtype=seq_len.dtype, device=seq_len.device))
    else:
        seq_len = max(seq_len, base_len)
    factor = scaling.factor
    base = theta * ((factor * seq_len / base_len) - (factor - 1)) ** (head_dim / (head_dim - 2))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (base**exponents)


def _llama3(head_dim: int, theta: float, scaling: RopeScalingConfig, device: torch.device | None) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by factor, short ones kept, a smooth blend between."""
    inv_freq = default_inv_freq(head_dim, theta, device)
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low) / (high - low)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def yarn_attention_factor(scaling: RopeScalingConfig) -> float:
    """YaRN's cos/sin scale: stated, or 0.1 ln(factor) + 1 (a ratio of two such terms with mscale/mscale_all_dim)."""
    if scaling.attention_factor:
        return scaling.attention_factor

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    if scaling.mscale and scaling.mscale_all_dim:
        return float(get_mscale(scaling.factor, scaling.mscale) / get_mscale(scaling.factor, scaling.mscale_all_dim))
    return get_mscale(scaling.factor)


def _yarn(
    head_dim: int, theta: float, scaling: RopeScalingConfig, device: torch.device | None
) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, ramp linearly between the correction dimensions."""
    dim, factor = head_dim, scaling.factor
    beta_fast, beta_slow = scaling.beta_fast or 32, scaling.beta_slow or 1
    base_len = scaling.original_max_position_embeddings

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(base_len / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)

    pos_freqs = theta ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, yarn_attention_factor(scaling)
