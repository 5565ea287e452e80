"""Faults through the command line (LUMINA_FAULTS): running out of memory backs off and continues from the last
checkpoint, and on two ranks an error between steps ends in one emergency checkpoint both agree on while one rank's
out-of-memory is recorded for the relaunch. The single-process fault paths (skip, rewind, E301, emergency checkpoint,
the guard's history) run in tests/training/test_faults_in_loop.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.runs import FAST, TRAIN, here, ranks, read_metrics


def test_out_of_memory_halves_the_micro_batch_and_continues_from_the_last_checkpoint(
    workdir: Path, tokenizer_file: Path
) -> None:
    args = ["train", *FAST, "--train-data", TRAIN, "--tokenizer", str(tokenizer_file), "--experiment-name", "oom",
            "--save-every-n-steps", "2"]  # fmt: skip
    proc = here([*args, "--max-steps", "6"], cwd=workdir, faults="oom@4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backing off from micro-batch 4 x accumulation 1 to micro-batch 2 x accumulation 2" in proc.stdout
    assert "no emergency checkpoint after StepOutOfMemoryError: it came inside optimizer step 4" in proc.stdout
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    logs = read_metrics(workdir / "runs" / "oom")[0]
    logged = [(r["step"], r["loss"]) for r in logs]
    assert [s for s, _ in logged] == [1, 2, 3, 3, 4, 5, 6]  # step 3 again, from the checkpoint of step 2
    # the same 4 rows and weights, now as 2 micro-batches of 2: the loss is the mean of the two halves' token means
    # rather than the token mean of all 4 rows (assistant-only targets differ per row), so close but not equal
    assert logged[3][1] == pytest.approx(logged[2][1], rel=0.05)
    ds_config = json.loads((workdir / "runs" / "oom" / "ds_config.json").read_text())
    assert (ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]) == (2, 2)
    # the next launch of the same run starts at the smaller shape
    again = here([*args, "--max-steps", "7", "--auto-resume"], cwd=workdir)
    assert again.returncode == 0 and "micro-batch 4 x accumulation 1 -> micro-batch 2 x accumulation 2" in again.stdout


def test_two_ranks_agree_on_an_emergency_checkpoint_and_one_ranks_oom_is_recorded_for_the_relaunch(
    workdir: Path, tokenizer_file: Path
) -> None:
    args = ["train", *FAST, "--train-data", TRAIN, "--tokenizer", str(tokenizer_file), "--experiment-name", "two",
            "--no-progress-bar", "--max-steps", "6", "--save-every-n-steps", "100"]  # fmt: skip
    crashed = ranks(args, cwd=workdir, faults="crash@3")
    assert crashed.returncode != 0 and "injected crash after step 3" in crashed.stderr + crashed.stdout
    assert "emergency checkpoint of step 3 saved after RuntimeError" in crashed.stdout
    tag = workdir / "runs" / "two" / "checkpoints" / "step_00000003"
    assert json.loads((tag / "complete.json").read_text())["world_size"] == 2
    # rank 1 alone runs out of memory in step 5: rank 0 waits in a collective it never joins, so nothing is retried
    # in place; the smaller shape is recorded and the launch ends
    oom = ranks([*args, "--auto-resume"], cwd=workdir, faults="oom@5:1")
    assert oom.returncode != 0 and "[E204]" in oom.stderr + oom.stdout and "recorded a backoff" in oom.stderr
    again = ranks([*args, "--auto-resume"], cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "micro-batch 4 x accumulation 1 -> micro-batch 2 x accumulation 2" in again.stdout
    assert "resumed from" in again.stdout and "at step 3" in again.stdout
    assert [r["step"] for r in read_metrics(workdir / "runs" / "two")[0]][-3:] == [4, 5, 6]
