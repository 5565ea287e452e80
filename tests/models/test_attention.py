"""Attention, RoPE and KV cache: causal masking, GQA, rotary properties, incremental decoding, document masks."""

from __future__ import annotations

import math

import pytest
import torch

from lumina_ds.models.attention import Attention, document_causal_mask
from lumina_ds.models.config import ModelConfig, MoEConfig
from lumina_ds.models.layers import RotaryEmbedding, apply_rotary
from lumina_ds.models.transformer import Transformer


def tiny_model(seed: int = 0, **overrides: object) -> Transformer:
    torch.manual_seed(seed)
    fields: dict[str, object] = dict(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_seq_len=64,
        tie_embeddings=False,
        init_std=0.1,  # larger than default so every layer visibly changes the logits
        moe=MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=32),
    )
    fields.update(overrides)
    model = Transformer(ModelConfig(**fields))  # type: ignore[arg-type]
    return model.eval()


def naive_attention(x: torch.Tensor, attn: Attention, position_ids: torch.Tensor) -> torch.Tensor:
    """Reference GQA causal attention written out: per head, softmax(q k^T / sqrt(d) + causal) v."""
    B, S, _ = x.shape
    nh, nkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    rope = RotaryEmbedding(hd, theta=10000.0)(position_ids)
    q = apply_rotary(attn.q_proj(x).view(B, S, nh, hd).transpose(1, 2), *rope)
    k = apply_rotary(attn.k_proj(x).view(B, S, nkv, hd).transpose(1, 2), *rope)
    v = attn.v_proj(x).view(B, S, nkv, hd).transpose(1, 2)
    out = torch.zeros(B, nh, S, hd)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    for h in range(nh):
        kv = h // (nh // nkv)  # query head h shares KV head h // group_size
        scores = q[:, h] @ k[:, kv].transpose(-1, -2) / math.sqrt(hd)  # [B, S, S]
        scores = scores.masked_fill(~causal, float("-inf"))
        out[:, h] = scores.softmax(-1) @ v[:, kv]
    return attn.o_proj(out.transpose(1, 2).reshape(B, S, nh * hd))


def test_causal_masking_future_tokens_do_not_change_past_logits() -> None:
    model = tiny_model()
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (2, 12))
    changed = ids.clone()
    t = 5
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 7) % 64
    with torch.no_grad():
        a = model(ids)["logits"]
        b = model(changed)["logits"]
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    # the changed positions themselves must see the change (the comparison above is not vacuous)
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().max() > 1e-3


def test_attention_matches_naive_reference() -> None:
    torch.manual_seed(0)
    attn = Attention(hidden_size=32, num_heads=4, num_kv_heads=2)
    x = torch.randn(2, 9, 32)
    pos = torch.arange(9).expand(2, 9)
    rope = RotaryEmbedding(8, theta=10000.0)(pos)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, rope), naive_attention(x, attn, pos), rtol=0, atol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_gqa_equals_mha_with_repeated_kv_heads(num_kv_heads: int) -> None:
    torch.manual_seed(0)
    hidden, heads = 32, 4
    hd, group = hidden // heads, heads // num_kv_heads
    gqa = Attention(hidden_size=hidden, num_heads=heads, num_kv_heads=num_kv_heads)
    mha = Attention(hidden_size=hidden, num_heads=heads, num_kv_heads=heads)
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(num_kv_heads, hd, hidden)
            getattr(mha, name).weight.copy_(w.repeat_interleave(group, dim=0).reshape(heads * hd, hidden))
        x = torch.randn(2, 10, hidden)
        rope = RotaryEmbedding(hd, theta=10000.0)(torch.arange(10).expand(2, 10))
        torch.testing.assert_close(gqa(x, rope), mha(x, rope), rtol=0, atol=1e-6)


def test_rope_matches_hand_rotation() -> None:
    """Half-split layout: the pair (x[i], x[i + hd/2]) is rotated by pos * theta^(-2i/hd)."""
    hd, theta, pos = 8, 10000.0, 3
    torch.manual_seed(0)
    x = torch.randn(1, 1, 1, hd)
    cos, sin = RotaryEmbedding(hd, theta=theta)(torch.tensor([[pos]]))
    got = apply_rotary(x, cos, sin)[0, 0, 0].tolist()
    v = x[0, 0, 0].tolist()
    half = hd // 2
    expected = [0.0] * hd
    for i in range(half):
        angle = pos * theta ** (-2 * i / hd)
        a, b = v[i], v[i + half]
        expected[i] = a * math.cos(angle) - b * math.sin(angle)
        expected[i + half] = a * math.sin(angle) + b * math.cos(angle)
    assert got == pytest.approx(expected, abs=1e-5)


def test_rope_position_zero_is_identity() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 1, 16)
    cos, sin = RotaryEmbedding(16, theta=10000.0)(torch.zeros(2, 1, dtype=torch.long))
    torch.testing.assert_close(apply_rotary(x, cos, sin), x, rtol=0, atol=0)


def test_rope_scores_depend_only_on_relative_position() -> None:
    hd = 16
    rope = RotaryEmbedding(hd, theta=10000.0)
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def score(m: int, n: int) -> float:
        cq, sq = rope(torch.tensor([[m]]))
        ck, sk = rope(torch.tensor([[n]]))
        return float((apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum())

    for m, n, d in [(0, 0, 5), (3, 1, 7), (2, 9, 11), (10, 4, 30)]:
        assert score(m + d, n + d) == pytest.approx(score(m, n), abs=1e-4)
    # and the score does change with the relative offset (the property above is not trivially true)
    assert abs(score(5, 0) - score(0, 0)) > 1e-3


@pytest.mark.parametrize("chunks", [[6, 1, 1, 1, 1], [4, 6], [1] * 10])
def test_kv_cache_decoding_equals_full_recomputation(chunks: list[int]) -> None:
    model = tiny_model()
    torch.manual_seed(2)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        full = model(ids)["logits"]
        cache = model.new_kv_cache()
        parts, start = [], 0
        for n in chunks:
            parts.append(model(ids[:, start : start + n], kv_cache=cache)["logits"])
            start += n
        assert start == 10
        assert all(c.length == 10 for c in cache)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


def test_block_diagonal_mask_equals_separate_documents() -> None:
    model = tiny_model()
    torch.manual_seed(3)
    len_a, len_b = 5, 7
    S = len_a + len_b
    doc_a, doc_b = torch.randint(0, 64, (1, len_a)), torch.randint(0, 64, (1, len_b))
    packed = torch.cat([doc_a, doc_b], dim=1)  # [1, S]
    position_ids = torch.cat([torch.arange(len_a), torch.arange(len_b)])[None]  # restart per document
    doc_id = torch.tensor([0] * len_a + [1] * len_b)
    same_doc = doc_id[:, None] == doc_id[None, :]
    mask = (same_doc & torch.ones(S, S, dtype=torch.bool).tril())[None, None]  # [1, 1, S, S]
    with torch.no_grad():
        packed_logits = model(packed, position_ids=position_ids, attn_mask=mask)["logits"]
        logits_a = model(doc_a)["logits"]
        logits_b = model(doc_b)["logits"]
        causal_only = torch.ones(S, S, dtype=torch.bool).tril()[None, None]
        unmasked = model(packed, position_ids=position_ids, attn_mask=causal_only)["logits"]
        implicit = model(packed, position_ids=position_ids)["logits"]
    separate = torch.cat([logits_a, logits_b], dim=1)
    torch.testing.assert_close(packed_logits, separate, rtol=0, atol=1e-5)
    # with a plain causal mask the second document attends to the first: its logits differ
    assert (unmasked[:, len_a:] - logits_b).abs().max() > 1e-3
    # position_ids that restart at 0 alone imply the document mask
    torch.testing.assert_close(implicit, separate, rtol=0, atol=1e-5)


def test_document_causal_mask_from_restarting_position_ids() -> None:
    position_ids = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])
    mask = document_causal_mask(position_ids)
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    expected_0 = [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    assert mask[0, 0].int().tolist() == expected_0
    assert mask[1, 0].int().tolist() == [[int(j <= i) for j in range(5)] for i in range(5)]
