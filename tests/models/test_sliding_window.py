"""Sliding-window attention on every path: the dense mask by hand, flex and flash-attn's window against it, packed
documents combined with windows, and KV-cache decoding past the window."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from lumina_ds.models.attention import (
    Attention,
    build_document_mask,
    document_block_mask,
    document_causal_mask,
    flex_document_attention,
)
from lumina_ds.models.config import ModelConfig, MoEConfig
from lumina_ds.models.layers import RotaryEmbedding
from lumina_ds.models.transformer import Transformer


def test_windowed_document_mask_by_hand() -> None:
    """Row: a 4-token document then a 2-token one; window 2 = a token and the one before it, in its document."""
    mask = document_causal_mask(torch.tensor([[0, 1, 2, 3, 0, 1]]), window=2)[0, 0].int()
    expected = [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 1, 1],
    ]
    assert mask.tolist() == expected


def packed_qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 40, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    pos = torch.tensor([[*range(23), *range(17)], list(range(40))])
    return q, k, v, pos


def test_flex_window_equals_dense_window() -> None:
    q, k, v, pos = packed_qkv()
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(pos, window=7), enable_gqa=True)
    flex = flex_document_attention(q, k, v, document_block_mask(pos, window=7))
    torch.testing.assert_close(flex, dense, rtol=0, atol=1e-5)
    full = F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(pos), enable_gqa=True)
    assert (full - dense).abs().max() > 1e-2  # the window changes the result


def test_flash_window_argument_is_flash_attns_left_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """flash-attn's window_size=(left, right) lets query i see keys i-left..i+right: left = window - 1 (a stand-in
    kernel that applies that documented rule per sequence, as flash-attn does, since no GPU is here)."""
    seen: list[tuple[int, int]] = []

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, causal, window_size=(-1, -1)):  # type: ignore[no-untyped-def]
        seen.append(window_size)
        out = torch.empty_like(q)
        for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
            n = e - s
            i, j = torch.arange(n)[:, None], torch.arange(n)[None]
            allowed = (j <= i) & (j >= i - window_size[0] if window_size[0] >= 0 else True)
            qi, ki, vi = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))
            out[s:e] = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=allowed, enable_gqa=True)[0].transpose(0, 1)
        return out

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=varlen))
    torch.manual_seed(1)
    attn = Attention(hidden_size=64, num_heads=4, num_kv_heads=2, window=7)
    _, _, _, pos = packed_qkv()
    x, rope = torch.randn(2, 40, 64), RotaryEmbedding(16, theta=10000.0)(pos)
    with torch.no_grad():
        flash = attn(x, rope, mask=build_document_mask(pos, "flash"))
        dense = attn(x, rope, mask=build_document_mask(pos, "sdpa", window=7))
    assert seen == [(6, 0)]
    torch.testing.assert_close(flash, dense, rtol=0, atol=1e-6)


def windowed_model(backend: str = "sdpa") -> Transformer:
    """Three layers, a window of 5 on layers 0 and 2 only, an MoE block on each."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=48,
        max_seq_len=64, init_std=0.1, attention_backend=backend, sliding_window=5, sliding_window_layers=[0, 2],
        moe=MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=24),
    )  # fmt: skip
    return Transformer(config).eval()


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_a_document_in_a_packed_row_is_windowed_as_alone(backend: str) -> None:
    model = windowed_model(backend)
    torch.manual_seed(2)
    doc, other = torch.randint(0, 64, (1, 12)), torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        alone = model(doc, position_ids=torch.arange(12)[None])["logits"]
        packed_ids = torch.cat([other, doc], dim=1)
        packed_pos = torch.cat([torch.arange(9), torch.arange(12)])[None]
        packed = model(packed_ids, position_ids=packed_pos)["logits"][:, 9:]
        unwindowed = Transformer(ModelConfig(**{**windowed_model().config.__dict__, "sliding_window": 0}))
        unwindowed.load_state_dict(model.state_dict())
        full = unwindowed.eval()(doc, position_ids=torch.arange(12)[None])["logits"]
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    assert (full - alone)[:, 5:].abs().max() > 1e-3  # past the window the logits depend on it
    torch.testing.assert_close(full[:, :5], alone[:, :5], rtol=0, atol=1e-5)  # within it they do not


def test_kv_cache_decoding_past_the_window_equals_the_full_forward() -> None:
    model = windowed_model()
    torch.manual_seed(3)
    ids = torch.randint(0, 64, (2, 17))
    with torch.no_grad():
        full = model(ids)["logits"]
        cache = model.new_kv_cache()
        steps = [model(ids[:, :4], kv_cache=cache)["logits"], model(ids[:, 4:9], kv_cache=cache)["logits"]]
        steps += [model(ids[:, t : t + 1], kv_cache=cache)["logits"] for t in range(9, 17)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
