"""The launch-time plan: a preset's layout checked against the machine a run starts on, before any tokenizer, data or
model work; re-planned when it does not fit (flags the user set stay), refused with E201/E202 when nothing fits."""

from __future__ import annotations

from pathlib import Path

import pytest

from lumina_ds.config.presets import get_preset
from lumina_ds.config.run import RunConfig
from lumina_ds.errors import MemoryPlanError
from lumina_ds.planning.launch_gate import Machine, check_launch, run_layout
from lumina_ds.planning.layouts import METADATA_KEY, adopt_layout, load_layout
from lumina_ds.planning.memory import estimate_memory
from lumina_ds.planning.memory_inputs import GIB
from tests.runs import TRAIN, here

A100_40 = 39.4  # GiB as torch reports an A100 40 GB


def adopted(preset: str, world_size: int, explicit: set[str] | None = None) -> tuple[RunConfig, str]:
    """A preset with its planned layout adopted for `world_size` processes, as `train --preset` resolves it."""
    run = get_preset(preset)
    layout = load_layout(preset)
    assert layout is not None
    adopt_layout(run, layout, world_size=world_size, explicit=explicit or set())
    return run, str(layout[METADATA_KEY]["cluster"])


def test_a_layout_that_fits_is_left_as_planned() -> None:
    run, planned_for = adopted("b7", 8)
    before = (run.distributed.zero_stage, run.train.micro_batch_size, run.train.grad_accum)
    h100 = Machine(8, 8, 79.1, 1024.0, "h100")  # the reference cluster itself
    assert check_launch(run, h100, precision="mixed_bf16", explicit=set(), planned_for=planned_for) is None
    assert (run.distributed.zero_stage, run.train.micro_batch_size, run.train.grad_accum) == before


def test_smaller_gpus_get_the_fastest_layout_that_fits_and_one_line_saying_so() -> None:
    run, planned_for = adopted("b7", 8)
    a100 = Machine(8, 8, A100_40, 1024.0, "a100")
    planned = estimate_memory(run.model, run_layout(run, a100, "mixed_bf16")).gpu_total / GIB
    assert planned > A100_40  # the H100 layout does not fit 40 GB
    line = check_launch(run, a100, precision="mixed_bf16", explicit=set(), planned_for=planned_for)
    assert line is not None and line.startswith("planned for 1x8 H100 79.1 GiB")
    assert "re-planned for 1x8 A100 39.4 GiB" in line
    assert estimate_memory(run.model, run_layout(run, a100, "mixed_bf16")).gpu_total / GIB <= A100_40


def test_a_flag_the_user_set_stays_as_set_in_the_re_plan() -> None:
    run, planned_for = adopted("b14", 8, explicit={"zero_stage"})
    run.distributed.zero_stage = 3  # --zero-stage 3
    a100 = Machine(8, 8, A100_40, 1024.0, "a100")
    check_launch(run, a100, precision="mixed_bf16", explicit={"zero_stage"}, planned_for=planned_for)
    assert run.distributed.zero_stage == 3
    assert estimate_memory(run.model, run_layout(run, a100, "mixed_bf16")).gpu_total / GIB <= A100_40


def test_nothing_fitting_one_node_is_plans_own_e202_and_hint() -> None:
    """The gate and `lumina-ds plan --preset b100 --nodes 1` use one memory model: the same refusal, the same nodes."""
    from lumina_ds.planning.planner import Cluster, plan

    run, planned_for = adopted("b100", 8)
    node = Machine(8, 8, 79.1, 1024.0, "h100")
    with pytest.raises(MemoryPlanError) as err:
        check_launch(run, node, precision="mixed_bf16", explicit=set(), planned_for=planned_for)
    with pytest.raises(MemoryPlanError) as planned:
        plan(get_preset("b100"), Cluster(1, 8, 79.1, 1024.0), precision="mixed_bf16")
    assert err.value.code == planned.value.code == "E202"
    assert err.value.message == f"on this machine: {planned.value.message}"
    assert err.value.hint.startswith(planned.value.hint) and "--nodes " in planned.value.hint
    assert "launch on that many nodes" in err.value.hint


def test_b100_on_this_cpu_machine_is_e202_before_anything_is_written(tmp_path: Path) -> None:
    refused = here(["train", "--preset", "b100", "--train-data", TRAIN], cwd=tmp_path)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "[E202] b100 does not fit this machine" in refused.stderr
    assert "presets that fit this machine: debug" in refused.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory, no tokenizer, no prepared data


def test_skip_memory_check_starts_without_the_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A layout the model says cannot fit still starts with --skip-memory-check (the model may overestimate)."""
    from lumina_ds.planning import launch_gate

    monkeypatch.setattr(launch_gate, "this_machine", lambda **_: Machine(1, 1, None, 0.01))  # a 10 MB machine
    argv = ["train", "--preset", "debug", "--train-data", TRAIN, "--max-steps", "1", "--seq-len", "64"]
    refused = here(argv, cwd=tmp_path)
    assert refused.returncode == 1 and "[E202] debug does not fit this machine" in refused.stderr
    started = here([*argv, "--skip-memory-check"], cwd=tmp_path)
    assert started.returncode == 0, started.stderr[-3000:]


def test_out_of_memory_while_the_engine_is_built_is_e204_naming_the_layout(tmp_path: Path) -> None:
    argv = ["train", "--preset", "debug", "--train-data", TRAIN, "--max-steps", "1", "--seq-len", "64"]
    failed = here(argv, cwd=tmp_path, faults="oom_init@0")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "[E204] out of memory building the model and its DeepSpeed engine (ZeRO-2, EP 1" in failed.stderr
    assert "--zero-stage 3" in failed.stderr
