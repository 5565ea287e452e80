"""Config validation: user mistakes raise ConfigError with a code and a useful message; YAML round-trips."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from lumina_ds.config import (
    PRESETS,
    DistributedConfig,
    RunConfig,
    TrainConfig,
    config_to_dict,
    get_preset,
    load_config,
    save_config,
)
from lumina_ds.errors import ConfigError, LuminaError
from lumina_ds.models.config import ModelConfig, MoEConfig
from lumina_ds.models.transformer import Transformer


def raises_config_error(fn: Callable[[], object], code: str, *fragments: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        fn()
    err = info.value
    assert err.code == code
    text = str(err)
    assert text.startswith(f"[{code}]")
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    return err


def test_unknown_preset_is_e001_and_lists_the_presets() -> None:
    err = raises_config_error(lambda: get_preset("b2"), "E001", "'b2'")
    assert isinstance(err, LuminaError)
    for name in PRESETS:
        assert name in err.hint


def test_hidden_not_divisible_by_heads() -> None:
    config = ModelConfig(hidden_size=100, num_heads=3, num_kv_heads=1)
    raises_config_error(config.validate, "E002", "hidden_size=100", "num_heads=3")
    raises_config_error(lambda: Transformer(config), "E002", "hidden_size=100")  # the model validates first


def test_heads_not_divisible_by_kv_heads() -> None:
    config = ModelConfig(hidden_size=96, num_heads=6, num_kv_heads=4)
    raises_config_error(config.validate, "E002", "num_heads=6", "num_kv_heads=4")


@pytest.mark.parametrize(("num_experts", "top_k"), [(4, 5), (2, 3), (16, 9)])
def test_top_k_larger_than_experts(num_experts: int, top_k: int) -> None:
    config = ModelConfig(moe=MoEConfig(num_experts=num_experts, top_k=top_k))
    raises_config_error(config.validate, "E002", f"top_k={top_k}", f"num_experts={num_experts}")


def test_dense_model_ignores_moe_fields() -> None:
    ModelConfig(moe=MoEConfig(num_experts=0, top_k=5)).validate()  # no error: MoE is off


def test_native_backend_with_zero_stage_3() -> None:
    config = RunConfig(distributed=DistributedConfig(zero_stage=3, moe_backend="native"))
    err = raises_config_error(config.validate, "E002", "ZeRO stage 3")
    assert "autoep" in err.hint
    RunConfig(distributed=DistributedConfig(zero_stage=2, moe_backend="native")).validate()
    RunConfig(distributed=DistributedConfig(zero_stage=3, moe_backend="autoep")).validate()


def test_experts_not_divisible_by_expert_parallel_size_lists_valid_sizes() -> None:
    config = get_preset("debug")  # 4 experts
    config.distributed.expert_parallel_size = 3
    err = raises_config_error(config.validate, "E002", "num_experts=4", "expert_parallel_size=3")
    assert "[1, 2, 4]" in err.hint
    config.distributed.expert_parallel_size = 2
    config.validate()


def test_expert_parallel_needs_a_moe_model() -> None:
    config = RunConfig(model=ModelConfig(moe=MoEConfig(num_experts=0)))
    config.distributed.expert_parallel_size = 2
    raises_config_error(config.validate, "E002", "expert_parallel_size")


def test_unknown_precision() -> None:
    config = RunConfig(train=TrainConfig(precision="fp8"))
    err = raises_config_error(config.validate, "E002", "'fp8'")
    assert "bf16" in err.hint and "fp32" in err.hint


@pytest.mark.parametrize("name", list(PRESETS))
def test_yaml_round_trip_for_every_preset(name: str, tmp_path: Path) -> None:
    config = get_preset(name)
    path = tmp_path / f"{name}.yaml"
    save_config(config, path)
    loaded = load_config(path)
    assert loaded == config
    assert isinstance(loaded.model.moe, MoEConfig)
    assert config_to_dict(loaded) == config_to_dict(config)
    assert yaml.safe_load(path.read_text())["model"]["hidden_size"] == config.model.hidden_size


def test_partial_yaml_keeps_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden_size: 64\n  moe:\n    top_k: 1\ntrain:\n  learning_rate: 0.001\n")
    config = load_config(path)
    assert config.model.hidden_size == 64 and config.model.moe.top_k == 1
    assert config.train.learning_rate == 0.001
    assert config.model.num_layers == ModelConfig().num_layers


@pytest.mark.parametrize(
    ("text", "key", "where"),
    [
        ("model:\n  hidden_sise: 64\n", "hidden_sise", "model"),
        ("model:\n  moe:\n    num_expert: 4\n", "num_expert", "model.moe"),
        ("trian:\n  epochs: 1\n", "trian", "config"),
    ],
)
def test_unknown_yaml_key_names_the_key(text: str, key: str, where: str, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    raises_config_error(lambda: load_config(path), "E002", repr(key), where)


def test_missing_and_invalid_yaml_files(tmp_path: Path) -> None:
    raises_config_error(lambda: load_config(tmp_path / "nope.yaml"), "E104", "does not exist")  # input files: E104
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    raises_config_error(lambda: load_config(bad), "E002", "not valid YAML")


def test_yaml_with_a_preset_overrides_only_what_it_names(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("preset: b7\nmodel:\n  moe:\n    top_k: 1\ntrain:\n  learning_rate: 1e-4\n")
    config = load_config(path)
    b7 = get_preset("b7")
    assert config.model.moe.top_k == 1 and config.train.learning_rate == 1e-4  # "1e-4" is a string to YAML
    assert config.model.hidden_size == b7.model.hidden_size and config.model.vocab_size == b7.model.vocab_size
    assert config.train.gradient_checkpointing is True


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("train:\n  epochs: three\n", "train.epochs must be an integer"),
        ("train:\n  learning_rate: fast\n", "train.learning_rate must be a number"),
        ("train:\n  compile: 1\n", "must be true or false"),
        ("preset: b9\n", "unknown preset"),
    ],
)
def test_yaml_values_of_the_wrong_type_are_e002(text: str, fragment: str, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert fragment in str(err.value)
