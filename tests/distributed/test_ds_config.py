"""The generated DeepSpeed JSON: batch arithmetic, precision sections, overrides, AutoEP patterns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lumina_ds.config.io import deep_merge
from lumina_ds.config.presets import get_preset
from lumina_ds.distributed.ds_config import (
    build_ds_config,
    load_deepspeed_json,
    precision_sections,
    resolve_precision,
)
from lumina_ds.distributed.expert_parallel import autoep_section
from lumina_ds.distributed.parallelize import parallelize
from lumina_ds.errors import ConfigError
from lumina_ds.models.transformer import Transformer


def test_batch_arithmetic_micro_times_accum_times_ranks() -> None:
    run = get_preset("debug")
    run.train.micro_batch_size, run.train.grad_accum, run.train.max_grad_norm = 4, 3, 0.5
    ds = build_ds_config(run, world_size=8, precision="fp32")
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 8
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": run.distributed.zero_stage}
    assert "bf16" not in ds and "fp16" not in ds


def test_precision_modes() -> None:
    assert precision_sections("fp32") == {}
    assert precision_sections("mixed_bf16") == {"bf16": {"enabled": True}}
    pure = precision_sections("bf16")["bf16"]
    assert pure["bf16_master_weights_and_grads"] and pure["bf16_optimizer_states"]
    assert precision_sections("mixed_fp16")["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert resolve_precision("auto", cuda=False, bf16_supported=False) == "fp32"
    assert resolve_precision("auto", cuda=True, bf16_supported=True) == "mixed_bf16"
    assert resolve_precision("auto", cuda=True, bf16_supported=False) == "mixed_fp16"
    assert resolve_precision("bf16", cuda=False, bf16_supported=False) == "bf16"


def test_user_json_overrides_nested_keys(tmp_path: Path) -> None:
    override = tmp_path / "ds.json"
    override.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "steps_per_print": 5}))
    run = get_preset("debug")
    run.distributed.zero_stage, run.distributed.deepspeed = 2, load_deepspeed_json(str(override))
    ds = build_ds_config(run, world_size=1, precision="fp32")
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["steps_per_print"] == 5
    assert deep_merge({"a": {"b": 1}}, {"a": 2}) == {"a": 2}


def test_bad_override_file_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError) as err:
        load_deepspeed_json(str(bad))
    assert err.value.code == "E002"
    with pytest.raises(ConfigError) as err:
        load_deepspeed_json(str(tmp_path / "missing.json"))
    assert err.value.code == "E104"


def test_autoep_pattern_matches_only_moe_layers() -> None:
    run = get_preset("debug")
    run.model.num_layers, run.model.moe.moe_every = 4, 2
    section = autoep_section(Transformer(run.model), ep_size=2, cuda=False)
    assert section["moe_layer_pattern"] == r"layers\.(1|3)\.ffn"
    assert section["autoep_size"] == 2 and section["top_k"] == 2 and not section["has_shared_experts"]
    # naming a shared-experts pattern without shared experts makes DeepSpeed warn on every rank of every run
    assert "shared_experts_pattern" not in section
    run.model.moe.num_shared_experts, run.model.moe.shared_intermediate_size = 1, 32
    shared = autoep_section(Transformer(run.model), ep_size=2, cuda=False)
    assert shared["has_shared_experts"] and shared["shared_experts_pattern"] == "shared"
    assert "async_split_plan" not in shared  # DeepSpeed raises on CPU tensors with it


def test_autoep_overlaps_its_split_plan_on_cuda_when_experts_are_spread() -> None:
    """AutoEP otherwise waits for the host once per MoE layer per pass (the split sizes of its all-to-all)."""
    model = Transformer(get_preset("debug").model)
    assert autoep_section(model, ep_size=2, cuda=True)["async_split_plan"] is True
    assert "async_split_plan" not in autoep_section(model, ep_size=1, cuda=True)  # nothing to exchange


def test_parallelize_only_adds_autoep_when_experts_are_split() -> None:
    run = get_preset("debug")
    model = Transformer(run.model)
    assert parallelize(model, run, rank=0) == {}  # ep 1: our own block, no replacement
    run.distributed.expert_parallel_size = 2
    assert "expert_parallel" in parallelize(Transformer(run.model), run, rank=0)
    run.train.gradient_checkpointing = True
    model = Transformer(run.model)
    parallelize(model, run, rank=0)
    assert model.recompute == "full"


def test_shipped_override_files_merge_into_the_generated_config() -> None:
    run = get_preset("debug")
    run.distributed.zero_stage = 2
    run.distributed.deepspeed = load_deepspeed_json(
        str(Path(__file__).resolve().parents[2] / "ds_configs" / "overlap_comm.json")
    )
    run.validate()  # the shipped file sets no key the run config owns
    zero = build_ds_config(run, world_size=2, precision="fp32")["zero_optimization"]
    assert zero["stage"] == 2 and zero["overlap_comm"] is True and zero["reduce_bucket_size"] == 50_000_000


@pytest.mark.parametrize(
    ("precision", "stage", "accum", "fp32_sums"),
    [
        ("mixed_bf16", 1, 16, True),
        ("mixed_bf16", 2, 2, True),
        ("mixed_bf16", 3, 32, True),
        ("mixed_bf16", 2, 1, False),  # nothing is summed: no fp32 copy
        ("mixed_bf16", 0, 16, False),  # DeepSpeed refuses fp32 sums without ZeRO
        ("bf16", 2, 16, False),  # pure bf16 keeps bf16 everywhere by choice
        ("fp32", 2, 16, False),
    ],
)
def test_accumulated_gradients_are_summed_in_fp32_under_mixed_bf16(
    precision: str, stage: int, accum: int, fp32_sums: bool
) -> None:
    run = get_preset("debug")
    run.distributed.zero_stage, run.train.grad_accum = stage, accum
    config = build_ds_config(run, world_size=2, precision=precision)
    assert (config.get("data_types") == {"grad_accum_dtype": "fp32"}) is fp32_sums
    assert fp32_sums or "data_types" not in config
