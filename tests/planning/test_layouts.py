"""lumina_ds/planning/layouts/<preset>.json: regenerated from the planner they must not drift; DeepSpeed accepts the
config every one resolves to; a launch on another number of GPUs adopts one with recomputed batch keys."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lumina_ds.config.presets import PRESETS, get_preset
from lumina_ds.config.run import owned_keys_in
from lumina_ds.distributed.ds_config import build_ds_config
from lumina_ds.planning.layouts import (
    LAYOUTS_DIR,
    METADATA_KEY,
    REFERENCE_CLUSTERS,
    adopt_layout,
    layout_for_plan,
)
from lumina_ds.planning.planner import plan


def load(preset: str) -> dict[str, Any]:
    return json.loads((LAYOUTS_DIR / f"{preset}.json").read_text())


class DataParallelOnly:
    """The slice of an mpu DeepSpeedConfig asks for: the data-parallel world size the file is meant for."""

    def __init__(self, world: int) -> None:
        self.world = world

    def get_data_parallel_world_size(self) -> int:
        return self.world


def deepspeed_accepts(config: dict[str, Any], world: int, monkeypatch: pytest.MonkeyPatch) -> Any:
    import deepspeed.runtime.config as ds_config_module
    from deepspeed.runtime.config import DeepSpeedConfig

    monkeypatch.setattr(ds_config_module.dist, "get_rank", lambda *a, **k: 0)  # no process group in this test
    return DeepSpeedConfig(config, mpu=DataParallelOnly(world))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_checked_in_config_is_what_ds_config_generates(preset: str) -> None:
    run = get_preset(preset)
    expected = layout_for_plan(run, plan(run, REFERENCE_CLUSTERS[preset]))
    assert load(preset) == expected, (
        f"lumina_ds/planning/layouts/{preset}.json is out of date: regenerate with "
        f"`lumina-ds ds-config --preset {preset} > lumina_ds/planning/layouts/{preset}.json`"
    )
    assert not owned_keys_in(expected), "a layout's DeepSpeed keys must be ones the run config does not own"


def resolved(preset: str, world: int) -> dict[str, Any]:
    """The DeepSpeed JSON a run of `preset` on `world` GPUs is initialised with (mixed bf16, as planned)."""
    run = get_preset(preset)
    adopt_layout(run, load(preset), world_size=world, explicit=set())
    run.validate()
    return build_ds_config(run, world_size=world, precision="mixed_bf16")


@pytest.mark.parametrize("preset", list(PRESETS))
def test_deepspeed_accepts_config_at_its_reference_size(preset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    meta = load(preset)[METADATA_KEY]
    assert meta["gpus"] == REFERENCE_CLUSTERS[preset].gpus
    config = resolved(preset, meta["gpus"])
    planned = meta["run"]
    assert config["train_micro_batch_size_per_gpu"] == planned["train"]["micro_batch_size"]
    assert config["zero_optimization"]["stage"] == planned["distributed"]["zero_stage"]
    ds = deepspeed_accepts(config, meta["gpus"], monkeypatch)
    assert (
        ds.train_batch_size
        == config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * meta["gpus"]
    )
    assert ds.zero_optimization_stage == config["zero_optimization"]["stage"]
    assert ds.bfloat16_config.enabled
    assert meta["predicted_gb_per_gpu"] <= REFERENCE_CLUSTERS[preset].gpu_mem_gib


def test_b200_file_adopted_on_fewer_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    config = load("b200")
    run = get_preset("b200")
    notes = adopt_layout(run, config, world_size=48, explicit=set())
    override = run.distributed.deepspeed
    assert run.distributed.zero_stage == 3
    assert run.distributed.expert_parallel_size == 8  # divides 128 experts and 48 GPUs
    assert (run.train.micro_batch_size, run.train.grad_accum) == (8, 8)  # the file's split, 64 rows per GPU
    assert run.train.gradient_checkpointing
    assert not {"train_batch_size", "bf16", METADATA_KEY, "seed"} & override.keys()
    assert "recomputed" in notes[-1]
    generated = build_ds_config(run, world_size=48, precision="mixed_bf16")
    assert generated["train_batch_size"] == 8 * 8 * 48
    assert generated["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert deepspeed_accepts(generated, 48, monkeypatch).train_batch_size == 3072


def test_flags_win_and_ep_shrinks_to_divide_the_world() -> None:
    run = get_preset("b300")
    run.distributed.zero_stage = 2
    notes = adopt_layout(run, load("b300"), world_size=6, explicit={"zero_stage", "micro_batch_size"})
    assert run.distributed.zero_stage == 2 and run.train.micro_batch_size == 1  # the preset's, not the file's 4
    assert run.distributed.expert_parallel_size == 6  # 8 does not divide 6 GPUs; 6 divides 144 and 6
    assert any("differs" in n for n in notes) and any("does not divide" in n for n in notes)
