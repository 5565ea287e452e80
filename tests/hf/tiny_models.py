"""Tiny random transformers models, one per supported architecture, each exercising that architecture's options.

Sizes are odd and head_dim is set apart from hidden / heads where the class allows it; every sliding window is
shorter than the 37-token probe; each RoPE scaling type appears; tied and untied embeddings both appear.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

BATCH, SEQ, VOCAB = 2, 37, 211
COMMON = {"vocab_size": VOCAB, "initializer_range": 0.1, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2}

CASES: dict[str, dict[str, Any]] = {
    # head_dim apart, window on every layer, yarn with a stated attention_factor's default (derived from factor)
    "MixtralForCausalLM": dict(
        hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=14, num_hidden_layers=2,
        intermediate_size=40, num_local_experts=5, num_experts_per_tok=2, sliding_window=13,
        max_position_embeddings=256, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "beta_fast": 16.0},
    ),
    # per-head q/k norm, dense layer via mlp_only_layers, renormalised top-k, window when used, linear RoPE, tied
    "Qwen3MoeForCausalLM": dict(
        hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=3,
        intermediate_size=72, moe_intermediate_size=24, num_experts=5, num_experts_per_tok=2, mlp_only_layers=[1],
        norm_topk_prob=True, use_sliding_window=True, sliding_window=20, max_position_embeddings=128,
        tie_word_embeddings=True, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    ),
    # gated shared expert, q/k/v bias, decoder_sparse_step 2, raw top-k weights, windows on even layers < 3,
    # dynamic NTK past max_position_embeddings (32 < 37 tokens), untied
    "Qwen2MoeForCausalLM": dict(
        hidden_size=40, num_attention_heads=5, num_key_value_heads=1, num_hidden_layers=4, intermediate_size=56,
        moe_intermediate_size=20, shared_expert_intermediate_size=28, num_experts=6, num_experts_per_tok=3,
        decoder_sparse_step=2, norm_topk_prob=False, qkv_bias=True, use_sliding_window=True, sliding_window=12,
        max_window_layers=3, max_position_embeddings=32, tie_word_embeddings=False,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    ),
    # q/k norm over the whole projection, raw top-k weights, llama3 RoPE, tied
    "OlmoeForCausalLM": dict(
        hidden_size=40, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=18,
        num_experts=6, num_experts_per_tok=3, norm_topk_prob=False, max_position_embeddings=64,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    ),
    # head_dim apart (12, hidden / heads = 11), llama3 RoPE, untied
    "LlamaForCausalLM": dict(
        hidden_size=44, num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_hidden_layers=2,
        intermediate_size=60, max_position_embeddings=64, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 2.0, "original_max_position_embeddings": 32},
    ),
    # window on every layer, plain RoPE, tied
    "MistralForCausalLM": dict(
        hidden_size=36, num_attention_heads=6, num_key_value_heads=3, num_hidden_layers=2, intermediate_size=50,
        sliding_window=9, max_position_embeddings=64, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # q/k/v bias, windows on layers >= max_window_layers, yarn with mscale / mscale_all_dim, tied
    "Qwen2ForCausalLM": dict(
        hidden_size=40, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3, intermediate_size=52,
        use_sliding_window=True, sliding_window=11, max_window_layers=1, max_position_embeddings=96,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "mscale": 0.8,
                         "mscale_all_dim": 0.5, "original_max_position_embeddings": 48},
    ),
    # per-head q/k norm, head_dim apart (20, hidden / heads = 16), one KV head, linear RoPE, untied
    "Qwen3ForCausalLM": dict(
        hidden_size=48, num_attention_heads=3, num_key_value_heads=1, head_dim=20, num_hidden_layers=2,
        intermediate_size=66, max_position_embeddings=64, tie_word_embeddings=False,
        rope_parameters={"rope_type": "linear", "rope_theta": 1000.0, "factor": 3.0},
    ),
}  # fmt: skip


def hf_config(arch: str, **overrides: Any) -> Any:
    import transformers

    return getattr(transformers, arch.replace("ForCausalLM", "Config"))(**{**COMMON, **CASES[arch], **overrides})


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Norm weights away from 1 and biases away from 0, so that a misplaced one cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=generator))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))


def hf_model(arch: str, config: Any = None) -> Any:
    """The tiny transformers model of `arch`, random, fp32, in eval mode."""
    import transformers

    torch.manual_seed(sum(map(ord, arch)))
    model = transformers.AutoModelForCausalLM.from_config(
        config or hf_config(arch), dtype=torch.float32, experts_implementation="eager"
    )
    randomize(model, seed=len(arch))
    return model.eval()


def probe() -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, position_ids) [2, 37]: one document per row."""
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    return input_ids, torch.arange(SEQ).expand(BATCH, SEQ)


def saved(model: Any, directory: Path) -> Path:
    """save_pretrained: the checkpoint layout on disk (per-expert tensors), as a hub download has it."""
    model.save_pretrained(directory)
    return directory
