"""RoPE scalings against transformers' own `ROPE_INIT_FUNCTIONS`: the same inverse frequencies, bit for bit, and the
same cos/sin factor, for each type and for head sizes where the schemes' branches (ramp, smoothing) all apply."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lumina_ds.errors import ConfigError
from lumina_ds.models.config import ModelConfig, RopeScalingConfig
from lumina_ds.models.layers import RotaryEmbedding
from lumina_ds.models.rope import dynamic_inv_freq, scaled_inv_freq

transformers = pytest.importorskip("transformers")

SCHEMES: dict[str, dict[str, Any]] = {
    "linear": {"factor": 3.0},
    "dynamic": {"factor": 2.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16.0, "beta_slow": 2.0},
    "yarn_mscale": {"factor": 8.0, "original_max_position_embeddings": 128, "mscale": 0.8, "mscale_all_dim": 0.5},
    "yarn_untruncated": {"factor": 2.0, "original_max_position_embeddings": 96, "truncate": False},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
}
MAX_POSITIONS, THETA = 256, 5000.0


def their_config(kind: str, head_dim: int) -> Any:
    params = {"rope_type": kind.split("_")[0], "rope_theta": THETA, **SCHEMES[kind]}
    return transformers.LlamaConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=MAX_POSITIONS,
        rope_parameters=params,
    )  # fmt: skip


def our_scaling(kind: str) -> RopeScalingConfig:
    from lumina_ds.hf.rope import rope_from_hf

    hf = their_config(kind, 16).to_dict()
    theta, scaling = rope_from_hf(hf, arch="LlamaForCausalLM", default_theta=0.0, max_positions=MAX_POSITIONS)
    assert theta == THETA
    return scaling


@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("kind", list(SCHEMES))
def test_inverse_frequencies_and_factor_equal_transformers(kind: str, head_dim: int) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = their_config(kind, head_dim)
    theirs, their_factor = ROPE_INIT_FUNCTIONS[kind.split("_")[0]](config, torch.device("cpu"))
    ours, our_factor = scaled_inv_freq(head_dim, THETA, our_scaling(kind))
    assert torch.equal(ours, theirs)
    assert our_factor == their_factor
    assert RotaryEmbedding(head_dim, theta=THETA, scaling=our_scaling(kind)).attention_factor == their_factor


@pytest.mark.parametrize("seq_len", [300, 1000])
def test_dynamic_frequencies_past_the_base_length_equal_transformers(seq_len: int) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = their_config("dynamic", 32)
    theirs, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, torch.device("cpu"), seq_len=torch.tensor(seq_len))
    ours = dynamic_inv_freq(32, THETA, our_scaling("dynamic"), torch.tensor(seq_len))
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, scaled_inv_freq(32, THETA, our_scaling("dynamic"))[0])  # the base did grow


def test_rotary_embedding_switches_to_dynamic_frequencies_past_the_base_length() -> None:
    rope = RotaryEmbedding(32, theta=THETA, scaling=our_scaling("dynamic"))
    short, long = torch.arange(200)[None], torch.arange(300)[None]
    cos_short, _ = rope(short)
    cos_long, _ = rope(long)
    assert torch.equal(cos_short[0], RotaryEmbedding(32, theta=THETA)(short)[0][0])  # below it: plain RoPE
    assert not torch.allclose(cos_long[0, :200], cos_short[0])


def test_default_scaling_is_the_plain_rope_of_before() -> None:
    """Presets keep their model: no scaling gives theta^(-2i/d) exactly as the module computed it."""
    inv_freq = RotaryEmbedding(64, theta=1e6).inv_freq
    assert torch.equal(inv_freq, 1.0 / (1e6 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)))
    assert ModelConfig().rope_scaling == RopeScalingConfig()


@pytest.mark.parametrize(
    ("scaling", "match"),
    [
        (RopeScalingConfig(type="ntk"), "unknown rope_scaling type"),
        (RopeScalingConfig(type="yarn", factor=2.0), "original_max_position_embeddings > 0"),
        (RopeScalingConfig(type="llama3", factor=8.0, original_max_position_embeddings=32, low_freq_factor=4.0,
                           high_freq_factor=1.0), "high_freq_factor > low_freq_factor"),
    ],
)  # fmt: skip
def test_invalid_scalings_are_config_errors(scaling: RopeScalingConfig, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as caught:
        scaling.validate()
    assert caught.value.code == "E002"
