"""Small building blocks: RMSNorm, SwiGLU feed-forward, rotary position embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lumina_ds.models.config import RopeScalingConfig
from lumina_ds.models.rope import dynamic_inv_freq, scaled_inv_freq, yarn_attention_factor


class RMSNorm(nn.Module):
    def __init__(self, dim: int, *, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32: bf16 squares lose too many bits
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), the feed-forward of dense layers and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RotaryEmbedding(nn.Module):
    """RoPE in the half-split layout (as Llama/Mixtral in transformers): angles computed from position ids.

    The frequencies are computed in fp32 where they are used and kept out of the module's buffers: a module-wide
    cast (DeepSpeed's bf16 engine, zero.Init's bf16 tensor constructors) would round them to bf16, which moves the
    angle at position 4096 by up to 7 rad at the long-context presets' theta. They are computed on the CPU and
    copied to each device, as transformers does (its buffers are built at init, then moved).
    """

    def __init__(self, head_dim: int, *, theta: float, scaling: RopeScalingConfig | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling or RopeScalingConfig()
        self._inv_freq: dict[torch.device, torch.Tensor] = {}  # per device, fp32
        # computed on first use, not here: zero.Init patches torch.arange to build bf16 tensors
        self.attention_factor = yarn_attention_factor(self.scaling) if self.scaling.type == "yarn" else 1.0

    def inv_freq_on(self, device: torch.device) -> torch.Tensor:
        """[head_dim / 2] fp32 inverse frequencies on `device` (dynamic NTK: at its base length)."""
        if device not in self._inv_freq:
            cpu = torch.device("cpu")
            if cpu not in self._inv_freq:
                self._inv_freq[cpu] = scaled_inv_freq(self.head_dim, self.theta, self.scaling)[0]
            self._inv_freq[device] = self._inv_freq[cpu].to(device)
        return self._inv_freq[device]

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.inv_freq_on(torch.device("cpu"))

    def reset_parameters(self) -> None:
        """Drop cached frequencies (they are recomputed in fp32 on first use)."""
        self._inv_freq.clear()

    def _frequencies(self, position_ids: torch.Tensor) -> torch.Tensor:
        if self.scaling.type == "dynamic":
            # the base grows with the longest position of the batch once past the base length (reads it back)
            seq_len = position_ids.max() + 1
            if seq_len > self.scaling.original_max_position_embeddings:
                return dynamic_inv_freq(self.head_dim, self.theta, self.scaling, seq_len, position_ids.device)
        return self.inv_freq_on(position_ids.device)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, S] -> cos, sin [B, S, head_dim] in fp32."""
        freqs = position_ids.float()[..., None] * self._frequencies(position_ids)  # [B, S, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, hd]
        if self.attention_factor == 1.0:
            return emb.cos(), emb.sin()
        return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, nh, S, hd], cos/sin [B, S, hd] -> rotated x, same dtype as x."""
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, S, hd]
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
