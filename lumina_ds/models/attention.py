"""Grouped-query causal self-attention with RoPE, SDPA (or flash-attn on GPU) and a KV cache."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from lumina_ds.models.layers import apply_rotary

FLASH_ATTN_AVAILABLE = importlib.util.find_spec("flash_attn") is not None


def document_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """position_ids [B, S] restarting at 0 per packed document -> [B, 1, S, S] bool, True = may attend.

    Block-diagonal causal: a token sees earlier tokens of its own document only.
    """
    S = position_ids.shape[1]
    doc = (position_ids == 0).cumsum(dim=-1)  # [B, S] document index of each token
    same_doc = doc[:, :, None] == doc[:, None, :]  # [B, S, S]
    causal = torch.ones(S, S, dtype=torch.bool, device=position_ids.device).tril()  # [S, S]
    return (same_doc & causal)[:, None]  # [B, 1, S, S]


class LayerKVCache:
    """Keys and values of one layer for incremental decoding: [B, n_kv, T, hd] grown along T."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, *, hidden_size: int, num_heads: int, num_kv_heads: int, backend: str = "auto") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.backend = backend
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        *,
        attn_mask: torch.Tensor | None = None,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        """x [B, S, H]; attn_mask [B, 1, S, T] bool (True = attend) or None for plain causal."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # [B, nh, S, hd]
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, nkv, S, hd]
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, nkv, S, hd]
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.update(k, v)  # [B, nkv, past+S, hd]
        if self._use_flash(q, attn_mask, past):
            out = self._flash(q, k, v)  # [B, S, nh, hd]
        else:
            out = self._sdpa(q, k, v, attn_mask, past).transpose(1, 2)  # [B, S, nh, hd]
        return self.o_proj(out.reshape(B, S, self.num_heads * self.head_dim))

    def _use_flash(self, q: torch.Tensor, attn_mask: torch.Tensor | None, past: int) -> bool:
        if self.backend == "sdpa" or not FLASH_ATTN_AVAILABLE or attn_mask is not None or past:
            return False
        return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)

    def _flash(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from flash_attn import flash_attn_func  # optional extra, GPU only

        # flash-attn takes [B, S, heads, hd] and handles GQA itself
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)

    def _sdpa(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, past: int
    ) -> torch.Tensor:
        S, T = q.shape[2], k.shape[2]
        if attn_mask is None and past and S > 1:
            # prefill after a cached prefix: query i sees keys up to past + i
            attn_mask = torch.ones(S, T, dtype=torch.bool, device=q.device).tril(diagonal=past)
        is_causal = attn_mask is None and S > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=True)
