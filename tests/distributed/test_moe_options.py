"""The MoE options imported models bring (raw top-k weights, a sigmoid-gated shared expert) across the expert-parallel
backends: AutoEP is configured to compute them and its module names are consolidated back to ours; the native
DeepSpeed layer, which cannot compute them, refuses them (E002) instead of training another model.

Measured once on 2 CPU ranks (ZeRO-1, debug preset with norm_topk_prob off and a gated shared expert, 3 steps):
AutoEP at EP 2 gave our block's losses at EP 1 to 2.4e-7; before this configuration they differed by 8e-4 at step 1
and the shared gate's weight was missing from the consolidated checkpoint.
"""

from __future__ import annotations

import pytest
from torch import nn

from lumina_ds.distributed.consolidate import consolidated_tensors
from lumina_ds.distributed.expert_parallel import apply_native_moe, autoep_section
from lumina_ds.errors import ConfigError
from lumina_ds.models.config import ModelConfig, MoEConfig
from lumina_ds.models.transformer import Transformer


def model_config(**moe: object) -> ModelConfig:
    fields: dict[str, object] = dict(num_experts=4, top_k=2, expert_intermediate_size=16)
    return ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       moe=MoEConfig(**{**fields, **moe}))  # type: ignore[arg-type]  # fmt: skip


def test_autoep_is_told_the_routing_norm_and_the_shared_gate() -> None:
    plain = autoep_section(Transformer(model_config()), ep_size=2, cuda=False)
    assert plain["route_norm"] is True and "shared_experts_gate_pattern" not in plain
    qwen2_moe = model_config(norm_topk_prob=False, num_shared_experts=1, shared_intermediate_size=24,
                             shared_expert_gate=True)  # fmt: skip
    section = autoep_section(Transformer(qwen2_moe), ep_size=2, cuda=False)
    assert section["route_norm"] is False
    assert section["shared_experts_pattern"] == "shared" and section["shared_experts_gate_pattern"] == "shared_gate"


def test_autoep_shared_gate_is_consolidated_under_our_name() -> None:
    """After replacement the block holds `shared_experts` and `shared_experts_gate` (DeepSpeed's names)."""
    ffn = nn.Module()
    ffn.shared_experts = nn.Module()
    ffn.shared_experts.w1 = nn.Linear(4, 6, bias=False)
    ffn.shared_experts_gate = nn.Linear(4, 1, bias=False)
    layer = nn.Module()
    layer.ffn = ffn
    model = nn.Module()
    model.layers = nn.ModuleList([layer])
    assert [name for name, _ in consolidated_tensors(model)] == [
        "layers.0.ffn.shared.w1.weight",
        "layers.0.ffn.shared_gate.weight",
    ]


@pytest.mark.parametrize(
    ("moe", "named"),
    [
        ({"norm_topk_prob": False}, "not renormalised"),
        ({"num_shared_experts": 1, "shared_intermediate_size": 24, "shared_expert_gate": True}, "gated shared expert"),
    ],
)
def test_native_moe_refuses_what_it_cannot_compute(moe: dict[str, object], named: str) -> None:
    model = Transformer(model_config(**moe))
    with pytest.raises(ConfigError, match=named) as caught:
        apply_native_moe(model, ep_size=1, ep_rank=0, deterministic=True)
    assert caught.value.code == "E002" and "--moe-backend autoep" in caught.value.hint
    assert all(type(layer.ffn).__name__ == "MoEBlock" for layer in model.layers)  # nothing was replaced
