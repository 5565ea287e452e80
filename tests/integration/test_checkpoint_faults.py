"""Checkpoints under faults, through the CLI: exact 2-rank resume where the ranks' data positions differ, a planted
pickle that runs nowhere, changed settings applied on resume, SIGUSR1 on 2 ranks, and a full disk."""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lumina_ds.training.checkpoint_files import file_digest
from tests.integration.conftest import FAST, ROOT, TRAIN, child_env, deepspeed_launch, free_port, lumina, read_metrics


class RunsCode:
    """A pickle that runs a shell command when loaded, as a tampered checkpoint file would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_rank_resume_is_exact_where_the_ranks_data_positions_differ(workdir: Path, stage: int) -> None:
    """Only rank 0's position used to be saved (and at ZeRO 0-2 read by every rank): rank 1 skipped or repeated. The
    position is now one global row, the same in every rank's file, from which each rank takes its micro-batches."""
    common = [*FAST, "--train-data", TRAIN, "--zero-stage", str(stage), "--precision", "fp32", "--no-progress-bar"]
    full = deepspeed_launch([*common, "--max-steps", "12", "--save-every-n-steps", "4", "--experiment-name", "a"],
                            cwd=workdir)  # fmt: skip
    assert full.returncode == 0
    tag = workdir / "runs" / "a" / "checkpoints" / "step_00000008"
    positions = [json.loads((tag / "lumina_state" / f"rank{r:05d}.json").read_text())["data"] for r in (0, 1)]
    # 8 steps x 2 ranks x 4 rows: the 64th row of the first epoch, whichever rank saved it (rank 1's rows of the
    # next step are rows 68-71, not rows of rank 1's own document share as before)
    assert [(p["epoch"], p["row"]) for p in positions] == [(0, 64), (0, 64)]
    resumed = deepspeed_launch([*common, "--max-steps", "12", "--save-every-n-steps", "100", "--experiment-name",
                                "b", "--resume", str(tag), "--tokenizer", str(tag.parents[1] / "tokenizer.json")],
                               cwd=workdir)  # fmt: skip
    assert resumed.returncode == 0
    expected = {r["step"]: r["loss"] for r in read_metrics(workdir / "runs" / "a")[0]}
    got = {r["step"]: r["loss"] for r in read_metrics(workdir / "runs" / "b")[0]}
    assert sorted(got) == [9, 10, 11, 12]
    assert all(math.isclose(got[s], expected[s], abs_tol=1e-5) for s in got), (got, expected)


def test_a_planted_pickle_runs_neither_on_resume_nor_in_chat(workdir: Path) -> None:
    base = ["train", *FAST, "--train-data", TRAIN, "--experiment-name", "p", "--save-every-n-steps", "2"]
    assert lumina([*base, "--max-steps", "2"], cwd=workdir).returncode == 0
    tag = workdir / "runs" / "p" / "checkpoints" / "step_00000002"
    marker = workdir / "code-ran"
    meta = json.loads((tag / "complete.json").read_text())
    planted = list(tag.glob("*.pt"))
    assert planted
    for path in planted:  # every DeepSpeed pickle, and the manifest rewritten to match (a thorough attacker)
        path.write_bytes(pickle.dumps(RunsCode(marker)))
        meta["files"][path.name] = {"size": path.stat().st_size, "xxh3": file_digest(path)}
    (tag / "complete.json").write_text(json.dumps(meta))
    resume = lumina([*base, "--max-steps", "4", "--resume", str(tag)], cwd=workdir)
    assert resume.returncode == 1 and "[E303]" in resume.stderr and "refused without running them" in resume.stderr
    chat = lumina(["chat", "--checkpoint", str(tag), "--prompt", "hi", "--max-tokens", "4", "--seed", "0"], cwd=workdir)
    assert chat.returncode == 0
    assert not marker.exists()


def test_changed_learning_rate_takes_effect_on_resume(workdir: Path) -> None:
    """config.yaml recorded the new rate while the restored optimizer kept the old one (and E301 advises the change)."""
    base = ["train", *FAST, "--train-data", TRAIN, "--experiment-name", "lr", "--lr-scheduler", "none",
            "--warmup-ratio", "0", "--save-every-n-steps", "4"]  # fmt: skip
    assert lumina([*base, "--max-steps", "4", "--learning-rate", "1e-3"], cwd=workdir).returncode == 0
    resumed = lumina([*base, "--max-steps", "6", "--learning-rate", "5e-4", "--auto-resume"], cwd=workdir)
    assert resumed.returncode == 0
    assert "resume: learning_rate: 0.001 -> 0.0005" in resumed.stdout
    lrs = {r["step"]: r["lr"] for r in read_metrics(workdir / "runs" / "lr")[0]}
    assert lrs[4] == pytest.approx(1e-3) and lrs[5] == pytest.approx(5e-4) and lrs[6] == pytest.approx(5e-4)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_to_one_of_two_ranks_stops_both_with_a_checkpoint_and_exit_128_plus_it(
    workdir: Path, sig: signal.Signals
) -> None:
    """SLURM's usual warning signal (sbatch --signal=USR1@120) used to kill the run without a checkpoint, and a run
    stopped by SIGTERM exited 0, like a finished one."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "launch" / "train.py"), *FAST, "--train-data", TRAIN, "--max-steps", "10000",
           "--save-every-n-steps", "100000", "--experiment-name", "sig", "--no-progress-bar"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=workdir, env=child_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    metrics = workdir / "runs" / "sig" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.monotonic() < deadline:
        time.sleep(0.5)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank=1" in " ".join(p.cmdline())]
    assert len(ranks) == 1
    ranks[0].send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, stderr[-3000:]
    assert f"stop_reason=signal {sig.name}" in stdout
    last = read_metrics(workdir / "runs" / "sig")[0][-1]["step"]
    assert (workdir / "runs" / "sig" / "checkpoints" / f"step_{last:08d}" / "complete.json").exists()
    assert (workdir / "runs" / "sig" / "report.png").stat().st_size > 0  # rank 0 draws it at a signal stop


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    """A 24 MB tmpfs: room for the run and about one checkpoint of `debug`."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the full-disk path is covered by the unit test with a fake engine")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_is_one_line_of_e303_and_keeps_every_earlier_tag(small_disk: Path, workdir: Path) -> None:
    args = ["train", *FAST, "--train-data", TRAIN, "--output-dir", str(small_disk), "--experiment-name", "full",
            "--save-every-n-steps", "1", "--save-total-limit", "20", "--max-steps", "20"]  # fmt: skip
    proc = lumina(args, cwd=workdir)
    assert proc.returncode == 1
    assert "[E303]" in proc.stderr and "Traceback" not in proc.stderr
    checkpoints = small_disk / "full" / "checkpoints"
    tags = sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step_"))
    assert tags and all((checkpoints / t / "complete.json").exists() for t in tags)
    assert not [p for p in checkpoints.iterdir() if ".saving-" in p.name]  # the partial tag is gone
