"""What the Hugging Face boundary refuses: options it cannot represent exactly (E005, naming the option and what is
supported) and checkpoints whose tensors do not fit the config (E303, naming the tensors)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from lumina_ds.errors import CheckpointError, ConfigError
from lumina_ds.hf.architectures import SUPPORTED, export_architecture, hf_config_from_model, model_config_from_hf
from lumina_ds.hf.weights import hf_to_ours, ours_to_hf
from lumina_ds.models.config import ModelConfig, MoEConfig
from lumina_ds.models.transformer import Transformer

pytest.importorskip("transformers")


def config_dict(arch: str, **overrides: Any) -> dict[str, Any]:
    from tests.hf.tiny_models import hf_config

    return {**hf_config(arch).to_dict(), **overrides}


def refusal(hf: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        model_config_from_hf(hf)
    assert caught.value.code == "E005"
    return str(caught.value)


def test_unknown_architecture_lists_the_supported_ones() -> None:
    message = refusal({"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"})
    assert "DeepseekV3ForCausalLM" in message
    assert all(name in message for name in SUPPORTED)


def test_weights_of_an_unknown_architecture_are_refused() -> None:
    model, tensors = checkpoint_of("LlamaForCausalLM")
    with pytest.raises(ConfigError, match="GPT2LMHeadModel: no weight mapping") as caught:
        hf_to_ours(model, "GPT2LMHeadModel", list(tensors), tensors.__getitem__)
    assert caught.value.code == "E005" and "MixtralForCausalLM" in caught.value.hint


def test_architectures_and_model_type_must_agree() -> None:
    message = refusal(config_dict("MistralForCausalLM", architectures=["MistralForCausalLM"], model_type="llama"))
    assert "model_type 'llama'" in message and "'mistral'" in message
    assert model_config_from_hf({"model_type": "qwen3_moe"}).arch == "Qwen3MoeForCausalLM"  # no architectures key


@pytest.mark.parametrize(
    ("arch", "overrides", "named"),
    [
        ("OlmoeForCausalLM", {"clip_qkv": 8.0}, "clip_qkv=8.0"),
        ("LlamaForCausalLM", {"mlp_bias": True}, "mlp_bias=True"),
        ("LlamaForCausalLM", {"attention_bias": True}, "attention_bias=True"),
        ("Qwen3ForCausalLM", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ("Qwen2MoeForCausalLM", {"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size"),
        ("LlamaForCausalLM", {"sliding_window": 16}, "sliding_window=16"),
        ("MistralForCausalLM", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "'longrope'"),
        ("Qwen2ForCausalLM", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                  "partial_rotary_factor": 0.5}}, "partial_rotary_factor=0.5"),
        ("MixtralForCausalLM", {"quantization_config": {"quant_method": "gptq"}}, "quantized"),
    ],
)  # fmt: skip
def test_unrepresentable_options_are_refused_by_name(arch: str, overrides: dict[str, Any], named: str) -> None:
    message = refusal(config_dict(arch, **overrides))
    assert arch in message and named in message


def test_refused_value_lists_the_supported_ones() -> None:
    assert "supported: [None]" in refusal(config_dict("OlmoeForCausalLM", clip_qkv=8.0))


def test_shared_experts_export_as_qwen2_moe_only_when_there_is_one() -> None:
    moe = MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=16, num_shared_experts=2,
                    shared_intermediate_size=16)  # fmt: skip
    model = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=48, max_seq_len=64, moe=moe)  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        export_architecture(model)
    assert caught.value.code == "E005" and "2 shared experts (it has exactly one)" in caught.value.message
    for gate in (False, True):  # ungated: written with a zero gate and a doubled down_proj (tests/hf)
        one = dataclasses.replace(model, moe=dataclasses.replace(moe, num_shared_experts=1, shared_expert_gate=gate))
        assert export_architecture(one) == "Qwen2MoeForCausalLM"
    with pytest.raises(ConfigError, match="qk_norm"):  # a named architecture that cannot carry it says why
        hf_config_from_model(one, arch="Qwen3MoeForCausalLM")


def checkpoint_of(arch: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from tests.hf.tiny_models import hf_model

    model = hf_model(arch)
    result = model_config_from_hf(model.config.to_dict())
    names, read = _our_checkpoint(result.model)
    tensors = dict(ours_to_hf(result.model, arch, names, read))
    return result.model, tensors


def _our_checkpoint(model: ModelConfig) -> tuple[list[str], Any]:
    torch.manual_seed(0)
    params = dict(Transformer(model).named_parameters())
    return list(params), lambda name: params[name].detach()


def e303(model: ModelConfig, arch: str, tensors: dict[str, torch.Tensor], **kwargs: Any) -> str:
    with pytest.raises(CheckpointError) as caught:
        names, read = hf_to_ours(model, arch, list(tensors), tensors.__getitem__, **kwargs)
        for name in names:
            read(name)
    assert caught.value.code == "E303"
    return caught.value.message


def test_a_dropped_expert_tensor_is_named() -> None:
    model, tensors = checkpoint_of("Qwen3MoeForCausalLM")
    dropped = "model.layers.2.mlp.experts.3.up_proj.weight"
    del tensors[dropped]
    message = e303(model, "Qwen3MoeForCausalLM", tensors)
    assert f"missing 1: {dropped}" in message


def test_unexpected_tensors_are_named_with_their_count() -> None:
    model, tensors = checkpoint_of("MixtralForCausalLM")
    extra = {f"model.layers.0.block_sparse_moe.experts.{5 + i}.w1.weight": torch.zeros(3) for i in range(7)}
    message = e303(model, "MixtralForCausalLM", {**tensors, **extra})
    assert "unexpected 7: model.layers.0.block_sparse_moe.experts.5.w1.weight" in message and ", ..." in message


@pytest.mark.parametrize("with_shapes", [True, False])
def test_a_wrongly_shaped_tensor_is_named(with_shapes: bool) -> None:
    model, tensors = checkpoint_of("Qwen2MoeForCausalLM")
    wrong = "model.layers.1.mlp.shared_expert.down_proj.weight"
    tensors[wrong] = tensors[wrong][:, :-1]
    shapes = {name: list(t.shape) for name, t in tensors.items()} if with_shapes else None
    message = e303(model, "Qwen2MoeForCausalLM", tensors, hf_shapes=shapes)
    assert wrong in message and "[40, 27]" in message and "[40, 28]" in message


def test_export_refuses_missing_weights_before_writing_anything() -> None:
    model, _ = checkpoint_of("OlmoeForCausalLM")
    names, read = _our_checkpoint(model)
    with pytest.raises(CheckpointError, match=r"missing 1: layers\.1\.attn\.k_norm\.weight"):
        ours_to_hf(model, "OlmoeForCausalLM", [n for n in names if n != "layers.1.attn.k_norm.weight"], read)


def test_export_reads_autoep_module_names() -> None:
    """Inside a running AutoEP engine the router and shared expert have DeepSpeed's names; the export takes them."""
    model, tensors = checkpoint_of("Qwen2MoeForCausalLM")
    names, read = _our_checkpoint(model)
    autoep = {n.replace(".ffn.gate.", ".ffn.router.gate.").replace(".ffn.shared_gate.", ".ffn.shared_experts_gate.")
              .replace(".ffn.shared.", ".ffn.shared_experts."): n for n in names}  # fmt: skip
    exported = dict(ours_to_hf(model, "Qwen2MoeForCausalLM", list(autoep), lambda n: read(autoep[n])))
    assert sorted(exported) == sorted(tensors)
    assert all(torch.equal(exported[name], tensors[name]) for name in tensors)


def test_every_preset_exports() -> None:
    """Up to b6 as Mixtral; from b7 (one ungated shared expert) as Qwen2-MoE."""
    from lumina_ds.config.presets import PRESETS, get_preset

    for name in PRESETS:
        model = get_preset(name).model
        expected = "Qwen2MoeForCausalLM" if model.moe.num_shared_experts else "MixtralForCausalLM"
        assert export_architecture(model) == expected, name
    assert get_preset("b6_quality").model.moe.num_shared_experts == 0 and get_preset("b7").model.moe.num_shared_experts
