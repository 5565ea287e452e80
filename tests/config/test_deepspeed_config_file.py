"""--deepspeed-config FILE: the keys lumina-ds does not decide merge into the run; the keys it owns may repeat the
resolved run's values (a ds_configs/<preset>.json has them all) and pass, or differ only because the file was made
for another cluster and pass with a note; any other difference is E002 naming the flag and both values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lumina_ds.cli import build_parser
from lumina_ds.config.presets import get_preset
from lumina_ds.config.run import RunConfig, owned_keys_in
from lumina_ds.distributed.ds_config import build_ds_config, check_deepspeed_file
from lumina_ds.errors import LuminaError
from lumina_ds.planning.layouts import adopt_layout, load_layout
from tests.runs import ROOT, TRAIN

DEBUG_JSON = ROOT / "ds_configs" / "debug.json"  # planned for 8 H100s: train_batch_size 64, bf16


def resolve(argv: list[str], *, world_size: int = 1, announce: bool = False) -> RunConfig:
    from lumina_ds.cli.train import resolve_run

    args = build_parser().parse_args(["train", "--train-data", TRAIN, *argv])
    return resolve_run(args, world_size=world_size, announce=announce)


def edited_debug_json(tmp_path: Path, **changes: Any) -> str:
    """ds_configs/debug.json with top-level keys replaced (a dict value merges into that section)."""
    content = json.loads(DEBUG_JSON.read_text())
    for key, value in changes.items():
        content[key] = {**content[key], **value} if isinstance(value, dict) else value
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    return str(path)


def test_the_committed_debug_file_resolves_for_a_debug_run_on_one_process(capsys: pytest.CaptureFixture[str]) -> None:
    run = resolve(["--preset", "debug", "--deepspeed-config", str(DEBUG_JSON)], announce=True)
    assert not owned_keys_in(run.distributed.deepspeed)  # the run's own values stand; the file only agreed
    config = build_ds_config(run, world_size=1, precision="fp32")
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"]) == (8, 8)  # 64 was for 8 processes
    assert config["zero_optimization"]["stage"] == 2 and "bf16" not in config
    out = capsys.readouterr().out
    assert "was made for 8 processes: train_batch_size 64 there, 8 on the 1 here" in out
    assert "--precision auto is mixed_bf16; here it is fp32" in out  # the file was made on a bf16 GPU


@pytest.mark.parametrize(
    ("changes", "key", "flag", "values"),
    [
        ({"gradient_clipping": 0.5}, "gradient_clipping", "--max-grad-norm", ("0.5", "1.0")),
        ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage", "--zero-stage", ("3", "2")),
        ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu", "--micro-batch-size", ("4", "8")),
        ({"seed": 7}, "seed", "--seed", ("7", "42")),
    ],
)
def test_a_changed_owned_value_is_e002_naming_the_flag_and_both_values(
    changes: dict[str, Any], key: str, flag: str, values: tuple[str, str], tmp_path: Path
) -> None:
    output = tmp_path / "runs"
    with pytest.raises(LuminaError) as err:
        resolve(["--deepspeed-config", edited_debug_json(tmp_path, **changes), "--output-dir", str(output)])
    assert err.value.code == "E002"
    assert f"{key} {values[0]} (this run: {values[1]})" in err.value.message
    assert f"{key}: use {flag}" in err.value.hint
    assert not output.exists()


def test_a_flag_that_differs_from_the_file_is_e002_too() -> None:
    with pytest.raises(LuminaError) as err:
        resolve(["--deepspeed-config", str(DEBUG_JSON), "--max-grad-norm", "0.25"])
    assert err.value.code == "E002" and "gradient_clipping 1.0 (this run: 0.25)" in err.value.message


def test_an_explicit_precision_other_than_the_files_is_e002() -> None:
    with pytest.raises(LuminaError) as err:
        resolve(["--deepspeed-config", str(DEBUG_JSON), "--precision", "fp32"])
    assert err.value.code == "E002"
    assert 'bf16 {"enabled": true} (this run: not set)' in err.value.message and "--precision" in err.value.hint


def test_keys_the_run_config_does_not_own_still_merge(tmp_path: Path) -> None:
    path = edited_debug_json(tmp_path, wall_clock_breakdown=True, zero_optimization={"reduce_bucket_size": 123})
    run = resolve(["--deepspeed-config", path])
    config = build_ds_config(run, world_size=1, precision="fp32")
    assert config["wall_clock_breakdown"] is True and config["zero_optimization"]["reduce_bucket_size"] == 123


def test_a_train_batch_size_alone_for_another_world_is_e002_saying_so(tmp_path: Path) -> None:
    """Without the file's micro-batch and accumulation beside it, train_batch_size asks for a global batch."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(LuminaError) as err:
        resolve(["--deepspeed-config", str(path)])
    assert "train_batch_size 64 (this run: 8)" in err.value.message
    assert "the file was made for 8 processes and this run has 1" in err.value.hint


def test_auto_and_disabled_sections_agree(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    hf_style = {"train_batch_size": "auto", "gradient_accumulation_steps": "auto", "fp16": {"enabled": False}}
    path.write_text(json.dumps(hf_style))
    run = resolve(["--deepspeed-config", str(path), "--precision", "fp32"])
    assert run.distributed.deepspeed_config == str(path) and not owned_keys_in(run.distributed.deepspeed)


def b14_run(world_size: int, *, expert_parallel_size: int | None = None) -> RunConfig:
    """b14 (AutoEP size 8 planned for 8 GPUs) as `train --preset b14 --deepspeed-config ds_configs/b14.json` resolves
    it: a 14B model's launch-time memory check is not the question here, so the layout is adopted directly."""
    run = get_preset("b14")
    explicit = set()
    if expert_parallel_size is not None:
        run.distributed.expert_parallel_size, explicit = expert_parallel_size, {"expert_parallel_size"}
    layout = load_layout("b14")
    assert layout is not None
    adopt_layout(run, layout, world_size=world_size, explicit=explicit)
    run.train.precision = "mixed_bf16"
    run.distributed.deepspeed_config = str(ROOT / "ds_configs" / "b14.json")
    return run


def test_an_autoep_size_that_does_not_divide_the_world_is_a_note() -> None:
    run = b14_run(world_size=3)
    assert run.distributed.expert_parallel_size == 1
    notes = check_deepspeed_file(run, world_size=3)
    assert any("AutoEP size 8 does not divide the 3 here" in note for note in notes)
    assert any("made for 8 processes" in note for note in notes)


def test_an_expert_parallel_flag_against_the_file_is_e002() -> None:
    run = b14_run(world_size=8, expert_parallel_size=1)  # the file's 8 divides 8: the flag disagrees with it
    with pytest.raises(LuminaError) as err:
        check_deepspeed_file(run, world_size=8)
    assert err.value.code == "E002" and "(this run: not set)" in err.value.message
    assert "expert_parallel: use --expert-parallel-size" in err.value.hint
