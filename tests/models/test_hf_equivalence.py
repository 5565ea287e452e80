"""Our model against independent implementations: transformers' MixtralForCausalLM (MoE) and LlamaForCausalLM (dense).

The weights are copied by renaming (the export layout); logits must agree to float32 round-off.
"""

from __future__ import annotations

import pytest
import torch

from lumina_ds.batch import IGNORE_INDEX
from lumina_ds.models.config import ModelConfig, MoEConfig
from lumina_ds.models.transformer import Transformer

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, EXPERTS, TOP_K, EXPERT_FFN, DENSE_FFN = 128, 64, 2, 4, 2, 4, 2, 32, 96


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Rename our parameters to the transformers Mixtral (MoE layers) / Llama (dense layers) layout."""
    sd = model.state_dict()
    out = {
        "model.embed_tokens.weight": sd["embed.weight"],
        "model.norm.weight": sd["norm.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(model.config.num_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        out[hf + "input_layernorm.weight"] = sd[ours + "attn_norm.weight"]
        out[hf + "post_attention_layernorm.weight"] = sd[ours + "ffn_norm.weight"]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[hf + f"self_attn.{proj}.weight"] = sd[ours + f"attn.{proj}.weight"]
        if ours + "ffn.gate.weight" in sd:
            out[hf + "mlp.gate.weight"] = sd[ours + "ffn.gate.weight"]  # [E, H]
            w1, w3 = sd[ours + "ffn.experts.w1"], sd[ours + "ffn.experts.w3"]  # [E, F, H]
            out[hf + "mlp.experts.gate_up_proj"] = torch.cat([w1, w3], dim=1)  # [E, 2F, H], gate rows first
            out[hf + "mlp.experts.down_proj"] = sd[ours + "ffn.experts.w2"]  # [E, H, F]
        else:
            out[hf + "mlp.gate_proj.weight"] = sd[ours + "ffn.w1.weight"]
            out[hf + "mlp.up_proj.weight"] = sd[ours + "ffn.w3.weight"]
            out[hf + "mlp.down_proj.weight"] = sd[ours + "ffn.w2.weight"]
    return out


def our_model(num_experts: int) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS,
        intermediate_size=DENSE_FFN, max_seq_len=256, rope_theta=10000.0, rms_norm_eps=1e-5, tie_embeddings=False,
        init_std=0.1, moe=MoEConfig(num_experts=num_experts, top_k=TOP_K, expert_intermediate_size=EXPERT_FFN),
    )  # fmt: skip
    model = Transformer(config).eval()
    with torch.no_grad():  # non-trivial norm weights, so a misplaced norm cannot go unnoticed
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


def hf_model(kind: str, attn_implementation: str) -> torch.nn.Module:
    common = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, attention_dropout=0.0,
    )  # fmt: skip
    if kind == "mixtral":
        config = transformers.MixtralConfig(
            **common, intermediate_size=EXPERT_FFN, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
            router_jitter_noise=0.0, experts_implementation="eager",
        )  # fmt: skip
        cls = transformers.MixtralForCausalLM
    else:
        config = transformers.LlamaConfig(**common, intermediate_size=DENSE_FFN, mlp_bias=False, attention_bias=False)
        cls = transformers.LlamaForCausalLM
    config._attn_implementation = attn_implementation
    return cls(config).to(torch.float32).eval()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize(("kind", "num_experts"), [("mixtral", EXPERTS), ("llama", 0)])
def test_logits_and_loss_match_transformers(kind: str, num_experts: int, attn_implementation: str) -> None:
    ours = our_model(num_experts)
    ref = hf_model(kind, attn_implementation)
    missing, unexpected = ref.load_state_dict(to_hf_state_dict(ours), strict=True)
    assert not missing and not unexpected
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 24))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)  # ours: pre-shifted
    with torch.no_grad():
        out = ours(ids, labels=labels)
        ref_out = ref(input_ids=ids, labels=ids)  # transformers shifts internally
    assert out["logits"].shape == ref_out.logits.shape == (2, 24, VOCAB)
    assert ref_out.logits.abs().max() > 0.1  # a non-degenerate comparison
    torch.testing.assert_close(out["logits"], ref_out.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(out["lm_loss"], ref_out.loss, rtol=0, atol=1e-5)


def test_mixtral_routing_is_exercised() -> None:
    """The tiny model must route tokens to several experts, or the MoE comparison above would prove little."""
    ours = our_model(EXPERTS)
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        counts = ours(ids, labels=ids)["metrics"]["expert_counts"]
    assert (counts > 0).all(), counts
