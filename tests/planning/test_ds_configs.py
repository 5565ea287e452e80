"""ds_configs/<preset>.json: each preset's DeepSpeed JSON on its reference cluster, as `lumina-ds ds-config --format
deepspeed` writes it and as a `train --preset X` run there gives it to DeepSpeed; regenerated, none may drift."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lumina_ds.cli import main
from lumina_ds.config.presets import PRESETS, get_preset
from lumina_ds.distributed.ds_config import build_ds_config, check_deepspeed_file
from lumina_ds.distributed.expert_parallel import autoep_section
from lumina_ds.distributed.parallelize import uses_autoep
from lumina_ds.models.transformer import meta_transformer
from lumina_ds.planning.layouts import REFERENCE_CLUSTERS, adopt_layout, ds_config_for_plan, load_layout
from lumina_ds.planning.planner import plan
from tests.runs import ROOT

DS_CONFIGS = ROOT / "ds_configs"
EXAMPLES = {"overlap_comm"}  # hand-written additions, not generated per preset


def committed(preset: str) -> dict[str, Any]:
    return json.loads((DS_CONFIGS / f"{preset}.json").read_text())


def regenerate(preset: str) -> str:
    return f"lumina-ds ds-config --preset {preset} --format deepspeed --output ds_configs/{preset}.json"


def test_every_preset_has_a_file_and_nothing_else_is_generated() -> None:
    assert {p.stem for p in DS_CONFIGS.glob("*.json")} - EXAMPLES == set(PRESETS)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_committed_file_is_what_ds_config_generates(preset: str) -> None:
    run = get_preset(preset)
    expected = ds_config_for_plan(run, plan(run, REFERENCE_CLUSTERS[preset]))
    assert committed(preset) == expected, (
        f"ds_configs/{preset}.json is out of date: regenerate with `{regenerate(preset)}` (every preset: "
        "`make ds-configs`)"
    )


def test_the_command_writes_the_file_byte_for_byte(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "debug.json"
    assert main(["ds-config", "--preset", "debug", "--format", "deepspeed", "--output", str(out)]) == 0
    assert out.read_text() == (DS_CONFIGS / "debug.json").read_text(), f"regenerate with `{regenerate('debug')}`"
    assert "1x8 H100" in capsys.readouterr().out
    assert main(["ds-config", "--preset", "debug", "--format", "deepspeed"]) == 0
    assert capsys.readouterr().out == out.read_text()


def run_on_reference_cluster(preset: str) -> tuple[Any, dict[str, Any]]:
    """A `train --preset X` run resolved on the reference cluster's process count (an H100's precision, as planned)
    and the DeepSpeed JSON it initialises with: build_ds_config plus the AutoEP section parallelize() adds."""
    gpus = REFERENCE_CLUSTERS[preset].gpus
    run = get_preset(preset)
    layout = load_layout(preset)
    assert layout is not None
    adopt_layout(run, layout, world_size=gpus, explicit=set())
    run.train.precision = "mixed_bf16"  # what --precision auto is on an H100
    run.validate()
    config = build_ds_config(run, world_size=gpus, precision="mixed_bf16")
    if uses_autoep(run):
        config["expert_parallel"] = autoep_section(
            meta_transformer(run.model), ep_size=run.distributed.expert_parallel_size, cuda=True
        )
    return run, config


@pytest.mark.parametrize("preset", list(PRESETS))
def test_a_run_on_the_reference_cluster_gives_deepspeed_the_file_and_takes_it_back(preset: str) -> None:
    run, config = run_on_reference_cluster(preset)
    assert config == committed(preset), f"ds_configs/{preset}.json: regenerate with `{regenerate(preset)}`"
    run.distributed.deepspeed_config = str(DS_CONFIGS / f"{preset}.json")
    assert check_deepspeed_file(run, world_size=REFERENCE_CLUSTERS[preset].gpus) == []  # every owned value agrees
