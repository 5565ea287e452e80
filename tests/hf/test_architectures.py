"""Each supported architecture against transformers itself: a tiny random model imported into lumina-ds gives the
same logits, our model exported loads in transformers (strictly) and gives the same logits, and the round trips
keep every tensor bit for bit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lumina_ds.hf.architectures import SUPPORTED, hf_config_from_model, model_config_from_hf
from lumina_ds.hf.weights import hf_to_ours, ours_to_hf
from lumina_ds.models.transformer import Transformer
from tests.hf.tiny_models import CASES, hf_model, probe

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

TOLERANCE = 1e-5  # fp32, the bound; measured: <= 1.3e-6


def checkpoint(model: Any, directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """save_pretrained's config.json and tensors: the per-expert layout a hub download holds."""
    model.save_pretrained(directory)
    from safetensors.torch import load_file

    return json.loads((directory / "config.json").read_text()), load_file(directory / "model.safetensors")


def imported(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Transformer:
    result = model_config_from_hf(config)
    names, read = hf_to_ours(result.model, result.arch, list(tensors), tensors.__getitem__)
    model = Transformer(result.model).eval()
    params = dict(model.named_parameters())
    assert names == list(params)
    with torch.no_grad():
        for name in names:
            params[name].copy_(read(name))
    return model


def our_logits(model: Transformer) -> torch.Tensor:
    input_ids, position_ids = probe()
    with torch.no_grad():
        return model(input_ids, position_ids=position_ids)["logits"]


def hf_logits(model: Any) -> torch.Tensor:
    input_ids, position_ids = probe()
    with torch.no_grad():
        return model(input_ids, position_ids=position_ids).logits


@pytest.mark.parametrize("arch", list(CASES))
def test_import_export_round_trip(arch: str, tmp_path: Path) -> None:
    hf = hf_model(arch)
    config, tensors = checkpoint(hf, tmp_path / "hf")
    reference = hf_logits(hf)

    ours = imported(config, tensors)
    _check_fused_import(hf, ours)
    import_diff = (our_logits(ours) - reference).abs().max().item()
    assert import_diff <= TOLERANCE, f"{arch}: import differs by {import_diff}"

    exported_config = hf_config_from_model(ours.config, arch="auto", token_ids=model_config_from_hf(config).token_ids)
    assert exported_config["architectures"] == [arch]  # auto picks the architecture it came from
    our_params = dict(ours.named_parameters())
    exported = dict(ours_to_hf(ours.config, arch, list(our_params), lambda n: our_params[n].detach()))
    assert sorted(exported) == sorted(tensors)  # round trip: the names save_pretrained writes, no more, no less
    for name, tensor in tensors.items():
        assert torch.equal(exported[name], tensor), name

    export_diff = _reloaded_diff(exported_config, exported, tmp_path / "export", our_logits(ours))
    assert export_diff <= TOLERANCE, f"{arch}: export differs by {export_diff}"
    print(f"{arch}: max |logit diff| import {import_diff:.2e}, export {export_diff:.2e}")  # pytest -s shows them


def _check_fused_import(hf: Any, ours: Transformer) -> None:
    """transformers 5's in-memory layout (fused gate_up_proj experts) imports to the same tensors."""
    state = hf.state_dict()
    names, read = hf_to_ours(ours.config, type(hf).__name__, list(state), state.__getitem__)
    assert names == [name for name, _ in ours.named_parameters()]
    assert all(torch.equal(read(name), param) for name, param in ours.named_parameters())


def _reloaded_diff(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], directory: Path, ours: torch.Tensor
) -> float:
    """Load an export in transformers (every tensor used, none missing or resized) -> max |logit diff| with ours."""
    from safetensors.torch import save_file

    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, experts_implementation="eager", output_loading_info=True
    )
    assert type(model).__name__ == config["architectures"][0]
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return (hf_logits(model.eval()) - ours).abs().max().item()


def test_every_supported_architecture_has_a_case() -> None:
    assert set(CASES) == set(SUPPORTED)


def test_debug_preset_exports_as_mixtral(tmp_path: Path) -> None:
    """A model lumina-ds trained (the debug preset: tied, all layers MoE) exports as Mixtral, equal in transformers."""
    from lumina_ds.config.presets import get_preset
    from tests.hf.tiny_models import randomize

    config = get_preset("debug").model
    torch.manual_seed(3)
    ours = Transformer(config).eval()
    randomize(ours, seed=3)
    exported_config = hf_config_from_model(config)
    assert exported_config["architectures"] == ["MixtralForCausalLM"] and exported_config["tie_word_embeddings"]
    params = dict(ours.named_parameters())
    exported = dict(ours_to_hf(config, "MixtralForCausalLM", list(params), lambda n: params[n].detach()))
    assert "lm_head.weight" not in exported  # tied: transformers takes the embedding
    diff = _reloaded_diff(exported_config, exported, tmp_path / "export", our_logits(ours))
    assert diff <= TOLERANCE


def test_an_ungated_shared_expert_exports_as_qwen2_moe_exactly(tmp_path: Path) -> None:
    """Our b7+ presets' shared expert has no gate; Qwen2-MoE's always has one: a zero gate (sigmoid 1/2) and a doubled
    down_proj make the export compute what we do."""
    from lumina_ds.models.config import ModelConfig, MoEConfig
    from tests.hf.tiny_models import randomize

    moe = MoEConfig(num_experts=5, top_k=2, expert_intermediate_size=20, num_shared_experts=1,
                    shared_intermediate_size=28)  # fmt: skip
    config = ModelConfig(vocab_size=211, hidden_size=40, num_layers=2, num_heads=5, num_kv_heads=1,
                         intermediate_size=56, max_seq_len=64, tie_embeddings=False, moe=moe)  # fmt: skip
    torch.manual_seed(11)
    ours = Transformer(config).eval()
    randomize(ours, seed=11)
    exported_config = hf_config_from_model(config)
    assert exported_config["architectures"] == ["Qwen2MoeForCausalLM"]
    params = dict(ours.named_parameters())
    exported = dict(ours_to_hf(config, "Qwen2MoeForCausalLM", list(params), lambda n: params[n].detach()))
    assert not exported["model.layers.1.mlp.shared_expert_gate.weight"].any()
    down = "model.layers.1.mlp.shared_expert.down_proj.weight"
    assert torch.equal(exported[down], 2 * params["layers.1.ffn.shared.w2.weight"])
    assert _reloaded_diff(exported_config, exported, tmp_path / "export", our_logits(ours)) <= TOLERANCE


@pytest.mark.parametrize("arch", ["Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"])
def test_consolidated_checkpoint_weights_export(arch: str) -> None:
    """A checkpoint's consolidated weights (what `export` reads) carry the names the mapping expects."""
    from lumina_ds.distributed.consolidate import consolidated_tensors
    from tests.hf.tiny_models import hf_config

    config = model_config_from_hf(hf_config(arch).to_dict()).model
    torch.manual_seed(5)
    model = Transformer(config)
    consolidated = dict(consolidated_tensors(model))
    exported = dict(ours_to_hf(config, arch, list(consolidated), consolidated.__getitem__))
    params = dict(model.named_parameters())
    expected = dict(ours_to_hf(config, arch, list(params), lambda n: params[n].detach()))
    assert sorted(exported) == sorted(expected) and all(torch.equal(exported[n], expected[n]) for n in expected)


def test_imported_configs_survive_the_run_config_yaml(tmp_path: Path) -> None:
    """import-hf writes the ModelConfig into config.yaml: every option must read back the same."""
    import dataclasses

    from lumina_ds.config.io import load_config, save_config
    from lumina_ds.config.presets import get_preset
    from tests.hf.tiny_models import hf_config

    for arch in CASES:
        model = model_config_from_hf(hf_config(arch).to_dict()).model
        save_config(dataclasses.replace(get_preset("debug"), model=model), tmp_path / "config.yaml")
        assert load_config(tmp_path / "config.yaml").model == model, arch


@pytest.mark.parametrize("arch", list(CASES))
def test_cached_decoding_equals_transformers(arch: str, tmp_path: Path) -> None:
    """Prefill 20 tokens, then one token at a time through the KV cache (what chat runs), against transformers doing
    the same: past the sliding windows, and past the dynamic NTK base length, where the cached keys keep the angles
    of the step that wrote them (so cached and full forwards differ, in transformers as in lumina-ds)."""
    hf = hf_model(arch)
    ours = imported(*checkpoint(hf, tmp_path))
    input_ids, _ = probe()
    prefill = 20
    with torch.no_grad():
        cache = ours.new_kv_cache()
        mine = [ours(input_ids[:, :prefill], kv_cache=cache)["logits"]]
        out = hf(input_ids[:, :prefill], use_cache=True)
        theirs = [out.logits]
        for t in range(prefill, input_ids.shape[1]):
            mine.append(ours(input_ids[:, t : t + 1], kv_cache=cache)["logits"])
            out = hf(input_ids[:, t : t + 1], cache=out.past_key_values, use_cache=True)
            theirs.append(out.logits)
    diff = (torch.cat(mine, dim=1) - torch.cat(theirs, dim=1)).abs().max().item()
    assert diff <= TOLERANCE, f"{arch}: cached decoding differs by {diff}"
