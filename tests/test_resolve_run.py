"""Flags -> the one resolved RunConfig: the run config owns what DeepSpeed and the loop must agree on; inputs and
config-only rules are checked before anything is built or written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lumina_ds.cli import build_parser
from lumina_ds.config.run import OWNED_DEEPSPEED_KEYS, RunConfig
from lumina_ds.distributed.ds_config import build_ds_config
from lumina_ds.errors import LuminaError
from tests.runs import EVAL, ROOT, TRAIN, here

OWNED = {
    "train_batch_size": ({"train_batch_size": 64}, "--micro-batch-size and --grad-accum"),
    "train_micro_batch_size_per_gpu": ({"train_micro_batch_size_per_gpu": 2}, "--micro-batch-size"),
    "gradient_accumulation_steps": ({"gradient_accumulation_steps": 3}, "--grad-accum"),
    "gradient_clipping": ({"gradient_clipping": 0.5}, "--max-grad-norm"),
    "zero_optimization.stage": ({"zero_optimization": {"stage": 3, "overlap_comm": True}}, "--zero-stage"),
    # bf16 master weights are --precision bf16, which no machine's --precision auto writes (a plain bf16 section is
    # what auto writes on a bf16 GPU: a note, tests/config/test_deepspeed_config_file.py)
    "bf16": ({"bf16": {"enabled": True, "bf16_master_weights_and_grads": True}}, "--precision"),
    "fp16": ({"fp16": {"enabled": True}}, "--precision"),
    "amp": ({"amp": {"enabled": True}}, "--precision"),
    "torch_autocast": ({"torch_autocast": {"enabled": True}}, "--precision"),
    "data_types": ({"data_types": {"grad_accum_dtype": "bf16"}}, "--precision"),
    "expert_parallel": ({"expert_parallel": {"enabled": True, "autoep_size": 2}}, "--expert-parallel-size"),
    "optimizer": ({"optimizer": {"type": "Adam", "params": {"lr": 1}}}, "--learning-rate"),
    "scheduler": ({"scheduler": {"type": "WarmupLR"}}, "--lr-scheduler"),
    "seed": ({"seed": 1}, "--seed"),
    "zero_optimization.offload_optimizer": (
        {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
        "--offload",
    ),
    "zero_optimization.offload_param": ({"zero_optimization": {"offload_param": {"device": "cpu"}}}, "--offload"),
    "zero_force_ds_cpu_optimizer": ({"zero_force_ds_cpu_optimizer": False}, "--offload"),
    "aio.block_size": ({"aio": {"block_size": 4096}}, "--offload-device nvme"),
    "aio.intra_op_parallelism": ({"aio": {"intra_op_parallelism": 4}}, "--offload-device nvme"),
}


def resolve(argv: list[str], *, world_size: int = 1) -> RunConfig:
    """As `train ARGV` resolves it on `world_size` processes of the preset's cluster (this CPU machine's memory is
    not the question here: tests/planning/test_launch_gate.py)."""
    from lumina_ds.cli.train import resolve_run

    args = build_parser().parse_args(["train", *argv, "--skip-memory-check"])
    return resolve_run(args, world_size=world_size, announce=False)


def ds_json(tmp_path: Path, content: dict[str, Any]) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    return str(path)


def test_every_owned_key_has_a_refusal_case() -> None:
    assert set(OWNED) == set(OWNED_DEEPSPEED_KEYS)


@pytest.mark.parametrize("key", sorted(OWNED))
def test_owned_key_in_deepspeed_json_is_e002_naming_the_flag(key: str, tmp_path: Path) -> None:
    content, flag = OWNED[key]
    output = tmp_path / "runs"
    argv = ["--train-data", TRAIN, "--output-dir", str(output), "--deepspeed-config", ds_json(tmp_path, content)]
    with pytest.raises(LuminaError) as err:
        resolve(argv)
    assert err.value.code == "E002"
    assert key in err.value.message and flag in err.value.hint
    assert not output.exists()


def test_refused_override_from_the_command_line_creates_no_run_directory(tmp_path: Path) -> None:
    """The user's path end to end: `lumina-ds train --deepspeed-config` with a batch key stops before any work."""
    path = ds_json(tmp_path, {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"overlap_comm": True}})
    proc = here(["train", "--train-data", TRAIN, "--deepspeed-config", path], cwd=tmp_path)
    assert proc.returncode == 1
    assert "[E002]" in proc.stderr and "--micro-batch-size" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_deepspeed_json_adds_what_the_run_config_does_not_model(tmp_path: Path) -> None:
    extras = {"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 123}, "communication_data_type": "fp32"}
    run = resolve(["--train-data", TRAIN, "--deepspeed-config", ds_json(tmp_path, extras), "--micro-batch-size", "3"])
    config = build_ds_config(run, world_size=2, precision="fp32")
    assert config["zero_optimization"]["stage"] == 2  # debug's planned layout
    assert config["zero_optimization"]["reduce_bucket_size"] == 123  # the user's key wins over the layout's
    assert config["zero_optimization"]["overlap_comm"] is True and config["communication_data_type"] == "fp32"
    assert config["train_micro_batch_size_per_gpu"] == 3 and config["train_batch_size"] == 3 * 1 * 2


def test_every_preset_run_adopts_its_planned_layout_and_flags_win() -> None:
    run = resolve(["--train-data", TRAIN])  # no --preset: debug
    assert run.distributed.zero_stage == 2 and run.distributed.deepspeed["zero_optimization"]["reduce_bucket_size"]
    run = resolve(["--preset", "debug", "--train-data", TRAIN, "--zero-stage", "1"])
    assert run.distributed.zero_stage == 1 and "zero_optimization" not in run.distributed.deepspeed
    # b14's layout (ZeRO-1, EP 8, 1 x 32 rows per GPU for 8 GPUs) on 4: EP 8 does not divide 4, the largest that
    # divides both the 8 experts and the 4 processes is taken; the rows per GPU stay
    run = resolve(["--preset", "b14", "--train-data", TRAIN], world_size=4)
    assert (run.distributed.zero_stage, run.distributed.expert_parallel_size) == (1, 4)
    assert (run.train.micro_batch_size, run.train.grad_accum) == (1, 32)


def test_a_yaml_config_is_taken_as_resolved(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("preset: debug\ndistributed: {zero_stage: 1}\n")
    run = resolve(["--config-file", str(config), "--train-data", TRAIN])
    assert run.distributed.zero_stage == 1 and run.distributed.deepspeed == {}


@pytest.mark.parametrize(
    ("flags", "code", "words"),
    [
        (["--seq-len", "512"], "E002", "longer than the model's context of 256"),
        (["--eval-data", "missing_eval.jsonl"], "E104", "evaluation data file not found"),
        (["--tokenizer", "missing_tok.json"], "E104", "tokenizer file not found"),
        (["--deepspeed-config", "missing_ds.json"], "E104", "does not exist"),
        (["--config-file", "missing.yaml"], "E104", "does not exist"),
    ],
)
def test_mistakes_are_found_before_any_work(flags: list[str], code: str, words: str, tmp_path: Path) -> None:
    output = tmp_path / "runs"
    argv = ["--train-data", TRAIN, "--eval-data", EVAL, "--output-dir", str(output)]
    with pytest.raises(LuminaError) as err:
        resolve([*argv, *[str(tmp_path / f) if f.startswith("missing") else f for f in flags]])
    assert err.value.code == code and words in err.value.message
    assert not output.exists()


def test_missing_training_file_among_several_is_e104() -> None:
    with pytest.raises(LuminaError) as err:
        resolve(["--train-data", f"{TRAIN},{ROOT / 'nope.jsonl'}:0.5"])
    assert err.value.code == "E104" and "nope.jsonl" in err.value.message


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--offload", "optimizer", "--zero-stage", "0"], "needs ZeRO stage 1, 2 or 3"),
        (["--offload", "optimizer+params", "--zero-stage", "2"], "offloading parameters needs ZeRO stage 3"),
    ],
)
def test_offload_needs_a_zero_stage_that_supports_it(flags: list[str], words: str) -> None:
    with pytest.raises(LuminaError) as err:
        resolve(["--train-data", TRAIN, *flags])
    assert err.value.code == "E002" and words in err.value.message


def test_offload_is_adopted_from_the_plan_and_derived_into_deepspeed() -> None:
    run = resolve(["--preset", "b200", "--train-data", TRAIN], world_size=256)
    assert run.distributed.offload == "optimizer" and run.distributed.zero_stage == 3
    assert "offload_optimizer" not in run.distributed.deepspeed.get("zero_optimization", {})  # not a user key
    zero = build_ds_config(run, world_size=256, precision="mixed_bf16")["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True} and "offload_param" not in zero
    run = resolve(["--preset", "b200", "--train-data", TRAIN, "--zero-stage", "2"], world_size=256)
    assert run.distributed.offload == "none"  # the plan's offload belongs to its ZeRO-3
