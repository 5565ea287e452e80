"""config.json read as transformers reads it: left-out keys, older files' RoPE keys and window rules."""

from __future__ import annotations

import pytest

from lumina_ds.hf.architectures import SUPPORTED, model_config_from_hf

pytest.importorskip("transformers")


@pytest.mark.parametrize("arch", list(SUPPORTED))
def test_keys_left_out_take_the_transformers_class_defaults(arch: str) -> None:
    """A config.json naming only the architecture reads as the class's full defaults do."""
    import transformers

    full = getattr(transformers, arch.replace("ForCausalLM", "Config"))().to_dict()
    stated = model_config_from_hf({**full, "architectures": [arch]})
    assert model_config_from_hf({"architectures": [arch]}).model == stated.model


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM"])
@pytest.mark.parametrize("first", [0, 2, 5])
def test_windowed_layers_without_layer_types_are_transformers(arch: str, first: int) -> None:
    """Older config.json files state use_sliding_window / max_window_layers and no layer_types."""
    import transformers

    keys = {"num_hidden_layers": 5, "use_sliding_window": True, "sliding_window": 7, "max_window_layers": first}
    theirs = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**keys).layer_types
    model = model_config_from_hf({"architectures": [arch], **keys}).model
    assert [model.layer_window(i) for i in range(5)] == [7 if t == "sliding_attention" else 0 for t in theirs]


LEGACY_ROPE = {  # transformers 4 config.json files: rope_theta at the top, rope_scaling with `type` or `rope_type`
    "LlamaForCausalLM": {"rope_theta": 500000.0, "max_position_embeddings": 131072,
                         "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    "Qwen2ForCausalLM": {"rope_theta": 1e6, "max_position_embeddings": 131072,
                         "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
    "Qwen3MoeForCausalLM": {"rope_theta": 1e6, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    "MixtralForCausalLM": {"rope_theta": 1e6, "rope_scaling": None},
}  # fmt: skip


@pytest.mark.parametrize("arch", list(LEGACY_ROPE))
def test_legacy_rope_keys_read_as_transformers_reads_them(arch: str) -> None:
    import transformers

    keys = LEGACY_ROPE[arch]
    theirs = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**keys).to_dict()
    ours = model_config_from_hf({"architectures": [arch], **keys}).model
    assert ours == model_config_from_hf({**theirs, "architectures": [arch]}).model
    assert ours.rope_theta == keys["rope_theta"] and ours.rope_scaling.type == (
        (keys["rope_scaling"] or {}).get("rope_type") or (keys["rope_scaling"] or {}).get("type") or "default"
    )
