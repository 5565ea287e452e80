"""Presets: every one builds (on the meta device) and has the parameter count its name promises; counting by hand."""

from __future__ import annotations

import pytest
import torch

from lumina_ds.config import PRESETS, get_preset
from lumina_ds.models.config import ModelConfig, MoEConfig
from lumina_ds.models.counting import count_parameters
from lumina_ds.models.transformer import Transformer

NAMED_SIZE = {
    "debug": 500e3, "m70": 70e6, "m120": 120e6, "b1": 1e9, "b3": 3e9, "b6": 6e9, "b7": 7e9, "b14": 14e9,
    "b50": 50e9, "b100": 100e9, "b200": 200e9, "b300": 300e9,
}  # fmt: skip


def named_size(preset: str) -> float:
    """debug -> 500K; m70_memory -> 70M; b3_inference -> 3B: the size in the preset's name."""
    return NAMED_SIZE[preset.split("_")[0]]


def test_all_twelve_presets_are_registered() -> None:
    assert len(PRESETS) == 12
    assert sorted(name.split("_")[0] for name in PRESETS) == sorted(NAMED_SIZE)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_builds_on_meta_and_validates(name: str) -> None:
    config = get_preset(name)
    assert config.preset == name
    config.validate()
    with torch.device("meta"):
        model = Transformer(config.model)
    params = list(model.parameters())
    assert params and all(p.device.type == "meta" for p in params)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_total_parameters_match_its_name(name: str) -> None:
    config = get_preset(name)
    counts = count_parameters(config.model)
    target = named_size(name)
    assert 0.85 * target <= counts.total <= 1.15 * target, f"{name}: {counts.total:,} vs {target:,.0f}"
    if config.model.moe.enabled:
        assert counts.active < counts.total
    assert sum(counts.by_component.values()) == counts.total


@pytest.mark.parametrize("name", ["debug", "m70_memory", "b7"])
def test_count_equals_numel_of_meta_build(name: str) -> None:
    config = get_preset(name).model
    with torch.device("meta"):
        model = Transformer(config)
    assert count_parameters(config).total == sum(p.numel() for _, p in model.named_parameters())


def test_debug_counts_by_component_by_hand() -> None:
    m = get_preset("debug").model
    assert m.tie_embeddings and m.moe.moe_every == 1 and m.moe.num_shared_experts == 0
    V, H, L, kv, hd = m.vocab_size, m.hidden_size, m.num_layers, m.num_kv_heads, m.hidden_size // m.num_heads
    E, F, k = m.moe.num_experts, m.moe.expert_intermediate_size, m.moe.top_k
    expected = {
        "embedding": V * H,
        "lm_head": 0,  # tied to the embedding
        "attention": L * (2 * H * H + 2 * H * kv * hd),  # q, o: H x H; k, v: H x kv*hd
        "norms": (2 * L + 1) * H,
        "router": L * H * E,
        "experts": L * E * 3 * H * F,
        "shared_experts": 0,
        "dense_mlp": 0,
    }
    counts = count_parameters(m)
    assert counts.by_component == expected
    assert counts.total == sum(expected.values()) == 509_568  # 2048*128 + 98304 + 640 + 1024 + 147456
    assert counts.active == counts.total - L * E * 3 * H * F * (E - k) // E
    # tied: the embedding lookup costs nothing, the output projection V*H does: compute params = active
    for seq_len in (None, 128):
        s = seq_len or m.max_seq_len
        expected_flops = 6 * counts.active + 12 * L * H * s
        assert count_parameters(m, seq_len=seq_len).flops_per_token == pytest.approx(expected_flops, rel=1e-12)


def test_untied_shared_and_interleaved_counts_by_hand() -> None:
    V, H, L, heads, kv, dense_ffn, E, F, k, shared_ffn = 100, 16, 4, 4, 2, 40, 6, 8, 2, 12
    m = ModelConfig(
        vocab_size=V, hidden_size=H, num_layers=L, num_heads=heads, num_kv_heads=kv, intermediate_size=dense_ffn,
        max_seq_len=32, tie_embeddings=False,
        moe=MoEConfig(num_experts=E, top_k=k, expert_intermediate_size=F, num_shared_experts=1,
                      shared_intermediate_size=shared_ffn, moe_every=2),
    )  # fmt: skip
    hd, moe_layers, dense_layers = H // heads, L // 2, L - L // 2
    expected = {
        "embedding": V * H,
        "lm_head": V * H,
        "attention": L * (2 * H * H + 2 * H * kv * hd),
        "norms": (2 * L + 1) * H,
        "router": moe_layers * H * E,
        "experts": moe_layers * E * 3 * H * F,
        "shared_experts": moe_layers * 3 * H * shared_ffn,
        "dense_mlp": dense_layers * 3 * H * dense_ffn,
    }
    counts = count_parameters(m)
    assert counts.by_component == expected
    assert counts.total == sum(expected.values())
    active = counts.total - moe_layers * 3 * H * F * (E - k)
    assert counts.active == active
    # untied: the lookup table is not compute, the head is
    assert counts.flops_per_token == pytest.approx(6 * (active - V * H) + 12 * L * H * 32, rel=1e-12)


def test_dense_model_active_equals_total() -> None:
    m = ModelConfig(moe=MoEConfig(num_experts=0))
    counts = count_parameters(m)
    assert counts.active == counts.total
    assert counts.by_component["router"] == counts.by_component["experts"] == 0
    assert counts.by_component["dense_mlp"] == m.num_layers * 3 * m.hidden_size * m.intermediate_size
