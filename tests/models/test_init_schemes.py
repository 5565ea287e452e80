"""Initialisation schemes: the std each one states per parameter group, and `scaled` is the pre-scheme init exactly."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from lumina_ds.config.presets import get_preset
from lumina_ds.errors import ConfigError
from lumina_ds.models.config import ModelConfig, MoEConfig
from lumina_ds.models.layers import RMSNorm, RotaryEmbedding
from lumina_ds.models.moe import GroupedExperts
from lumina_ds.models.transformer import Transformer

LAYERS, STD = 8, 0.02
# layer 3 is dense (SwiGLU w2 is a residual output too); every MoE layer has a shared expert
CONFIG = ModelConfig(vocab_size=1024, hidden_size=256, num_layers=LAYERS, num_heads=4, num_kv_heads=2,
                     intermediate_size=512, max_seq_len=64, tie_embeddings=False, init_std=STD,
                     moe=MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=256, num_shared_experts=1,
                                   shared_intermediate_size=256, dense_layers=[3]))  # fmt: skip
# the std of o_proj and every w2 (routed, shared, dense) in layer i, written out from each scheme's definition
OUTPUT_STD = {
    "normal": lambda i: 0.02,
    "scaled": lambda i: 0.02 / 4.0,  # / sqrt(2 * 8 layers)
    "depth": lambda i: 0.02 / math.sqrt(2 * (i + 1)),  # torchtitan's depth_init
}


def built_on_meta(config: ModelConfig, seed: int) -> Transformer:
    """A model built without memory (meta), then materialised on the CPU and initialised from the seed."""
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.reset_parameters()
    return model


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "layers" else None


@pytest.mark.parametrize("scheme", ["normal", "scaled", "depth"])
def test_each_parameter_group_has_the_stated_std(scheme: str) -> None:
    config = dataclasses.replace(CONFIG, init_scheme=scheme)
    model = built_on_meta(config, seed=11)
    checked = set()
    for name, p in model.named_parameters():
        kind = name.rsplit(".", 2)[-2] if name.endswith("weight") else name.rsplit(".", 1)[-1]
        if kind.endswith("norm"):
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        residual_output = kind in ("o_proj", "w2")
        expected = OUTPUT_STD[scheme](layer_of(name)) if residual_output else STD
        n = p.numel()
        # the sample std of n normals has relative standard error 1/sqrt(2n): allow 5 of them
        assert p.std().item() == pytest.approx(expected, rel=5 / math.sqrt(2 * n)), name
        assert abs(p.mean().item()) < 5 * expected / math.sqrt(n), name
        checked.add(kind)
    assert checked == {"embed", "lm_head", "q_proj", "k_proj", "v_proj", "o_proj", "gate", "w1", "w2", "w3"}


def test_schemes_differ_only_in_residual_outputs() -> None:
    """Same seed: every draw outside o_proj/w2 is identical, and the outputs are the same noise rescaled."""
    models = {s: built_on_meta(dataclasses.replace(CONFIG, init_scheme=s), seed=5) for s in OUTPUT_STD}
    normal = dict(models["normal"].named_parameters())
    for scheme in ("scaled", "depth"):
        for name, p in models[scheme].named_parameters():
            if name.rsplit(".", 1)[-1] == "w2" or ".w2." in name or ".o_proj." in name:
                ratio = OUTPUT_STD[scheme](layer_of(name)) / STD
                torch.testing.assert_close(p, normal[name] * ratio, rtol=1e-6, atol=0)
            else:
                assert torch.equal(p, normal[name]), name


def pre_scheme_init(model: Transformer) -> None:
    """The initialisation lumina-ds had before init_scheme existed, written out: residual outputs at
    init_std / sqrt(2 * num_layers), everything else normal(init_std), in named_modules() order."""
    std = model.config.init_std
    out_std = std / math.sqrt(2 * model.config.num_layers)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=out_std if name.rsplit(".", 1)[-1] in ("o_proj", "w2") else std)
        elif isinstance(module, GroupedExperts):
            for pname, p in module.named_parameters():
                nn.init.normal_(p, std=out_std if pname == "w2" else std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, RotaryEmbedding):
            module.reset_parameters()


def test_scaled_reproduces_the_debug_presets_weights_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """The presets' weights before `normal` became the default stay one flag away (--init-scheme scaled)."""
    config = dataclasses.replace(get_preset("debug").model, init_scheme="scaled")
    torch.manual_seed(1234)
    model = Transformer(config)
    monkeypatch.setattr(Transformer, "reset_parameters", pre_scheme_init)  # the constructor's draws stay the same
    torch.manual_seed(1234)
    reference = Transformer(config)
    for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert model.layers[1].attn.o_proj.weight.std().item() == pytest.approx(0.01, rel=0.05)  # 0.02 / sqrt(2 * 2)


def test_unknown_scheme_is_e002() -> None:
    with pytest.raises(ConfigError) as err:
        ModelConfig(init_scheme="xavier").validate()
    assert err.value.code == "E002" and "depth" in (err.value.hint or "")


def test_train_flag_sets_the_scheme_and_is_refused_with_init_from() -> None:
    from lumina_ds.cli import build_parser
    from lumina_ds.cli.train import resolve_run
    from lumina_ds.errors import LuminaError
    from tests.runs import TRAIN

    def resolve(*argv: str) -> str:
        args = build_parser().parse_args(["train", "--train-data", str(TRAIN), *argv])
        return resolve_run(args, world_size=1, announce=False).model.init_scheme

    assert resolve() == "normal" and resolve("--init-scheme", "scaled") == "scaled"
    with pytest.raises(LuminaError) as err:  # the weights come from the source: the scheme would be ignored
        resolve("--init-scheme", "normal", "--init-from", "no/such/dir")
    assert err.value.code == "E002" and "--init-scheme" in err.value.message
