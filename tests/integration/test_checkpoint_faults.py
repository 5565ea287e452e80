"""Checkpoints under faults, through the CLI: a planted pickle that runs nowhere, changed settings applied on resume,
a stop signal to one of two ranks, and a full disk."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lumina_ds.training.checkpoint_files import file_digest
from tests.runs import EVAL, FAST, TRAIN, here, read_metrics, start_ranks


class RunsCode:
    """A pickle that runs a shell command when loaded, as a tampered checkpoint file would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def plant(tag: Path, marker: Path) -> None:
    """Every DeepSpeed pickle of `tag` replaced by one that runs code, and the manifest rewritten to match (a thorough
    attacker)."""
    meta = json.loads((tag / "complete.json").read_text())
    planted = list(tag.glob("*.pt"))
    assert planted
    for path in planted:
        path.write_bytes(pickle.dumps(RunsCode(marker)))
        meta["files"][path.name] = {"size": path.stat().st_size, "xxh3": file_digest(path)}
    (tag / "complete.json").write_text(json.dumps(meta))


def test_a_planted_pickle_runs_neither_on_resume_nor_in_chat(copied_run: Path, workdir: Path) -> None:
    last, middle = (copied_run / "checkpoints" / name for name in ("step_00000012", "step_00000002"))
    marker = workdir / "code-ran"
    plant(last, marker)
    resume = here(["train", *FAST, "--train-data", TRAIN, "--experiment-name", "p", "--max-steps", "14", "--resume",
                   str(last)], cwd=workdir)  # fmt: skip
    assert resume.returncode == 1 and "[E303]" in resume.stderr and "refused without running them" in resume.stderr
    chat = here(["chat", "--checkpoint", str(last), "--prompt", "hi", "--max-tokens", "4", "--seed", "0"], cwd=workdir)
    assert chat.returncode == 0, chat.stderr[-3000:]  # the consolidated weights are safetensors
    plant(middle, marker)  # a tag without them: chat writes them from DeepSpeed's pickles, with weights-only loads
    chat = here(["chat", "--checkpoint", str(middle), "--prompt", "hi", "--max-tokens", "4"], cwd=workdir)
    assert chat.returncode == 1 and "[E303]" in chat.stderr and "refused without running them" in chat.stderr
    assert not marker.exists()


def test_changed_optimisation_settings_take_effect_on_resume(copied_run: Path, workdir: Path) -> None:
    """config.yaml recorded the new rate while the restored optimizer kept the old one (and E301 advises the change)."""
    tag = copied_run / "checkpoints" / "step_00000008"
    args = ["train", *FAST, "--train-data", TRAIN, "--experiment-name", "shared", "--max-steps", "12", "--resume",
            str(tag), "--learning-rate", "1e-3", "--lr-scheduler", "none"]  # fmt: skip
    resumed = here(args, cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume: learning_rate: 0.003 -> 0.001" in resumed.stdout  # debug's planned rate is 3e-3
    assert "resume: lr_scheduler: cosine -> none" in resumed.stdout
    lrs = {r["step"]: r["lr"] for r in read_metrics(copied_run)[0]}
    assert lrs[8] < 1e-3 and all(lrs[s] == pytest.approx(1e-3) for s in (9, 10, 11, 12))


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_to_one_of_two_ranks_stops_both_with_a_checkpoint_and_exit_128_plus_it(
    workdir: Path, tokenizer_file: Path, sig: signal.Signals
) -> None:
    """SLURM's usual warning signal (sbatch --signal=USR1@120) used to kill the run without a checkpoint, and a run
    stopped by SIGTERM exited 0, like a finished one. The stop saves without evaluating first (an evaluation spent
    the time the warning leaves for the checkpoint)."""
    group = start_ranks(["train", *FAST, "--train-data", TRAIN, "--tokenizer", str(tokenizer_file), "--max-steps",
                         "10000", "--save-every-n-steps", "100000", "--experiment-name", "sig", "--no-progress-bar",
                         "--eval-data", EVAL, "--eval-every-n-steps", "100000"], cwd=workdir)  # fmt: skip
    metrics = workdir / "runs" / "sig" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(group.processes[1].pid, sig)
    done = group.wait()
    assert done.returncode == 128 + sig, done.stderr[-3000:]
    assert all(p.exitcode == 128 + sig for p in group.processes)  # both ranks stopped at the same step boundary
    assert f"stop_reason=signal {sig.name}" in done.stdout
    logs, evaluations = read_metrics(workdir / "runs" / "sig")
    last = logs[-1]["step"]
    assert (workdir / "runs" / "sig" / "checkpoints" / f"step_{last:08d}" / "complete.json").exists()
    assert evaluations == []  # a finished run evaluates at its end; a signalled one only saves
    assert (workdir / "runs" / "sig" / "report.png").stat().st_size > 0  # rank 0 draws it at a signal stop


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
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


def test_a_full_disk_is_one_line_of_e303_and_keeps_every_earlier_tag(
    small_disk: Path, workdir: Path, tokenizer_file: Path
) -> None:
    args = ["train", *FAST, "--train-data", TRAIN, "--output-dir", str(small_disk), "--experiment-name", "full",
            "--tokenizer", str(tokenizer_file), "--save-every-n-steps", "1", "--save-total-limit", "20",
            "--max-steps", "20"]  # fmt: skip
    proc = here(args, cwd=workdir)
    assert proc.returncode == 1
    assert "[E303]" in proc.stderr and "Traceback" not in proc.stderr
    checkpoints = small_disk / "full" / "checkpoints"
    tags = sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step_"))
    assert tags and all((checkpoints / t / "complete.json").exists() for t in tags)
    assert not [p for p in checkpoints.iterdir() if ".saving-" in p.name]  # the partial tag is gone


def fill(disk: Path) -> None:
    """Write to `disk` until it is full, as another process's output would (unbuffered: nothing left to flush)."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for chunk in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:  # no space left for this chunk size: try smaller ones
                continue
    finally:
        os.close(fd)


def test_a_disk_that_fills_while_the_weights_are_written_is_e303_not_a_retry(
    small_disk: Path, workdir: Path, tokenizer_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """safetensors raises its own SafetensorError on a full disk: that was a traceback, with an emergency save
    retried onto the same full disk."""
    from lumina_ds.training import checkpoint

    write_consolidated = checkpoint.write_consolidated

    def fill_then_write(*args: Any, **kwargs: Any) -> Any:
        fill(small_disk)
        return write_consolidated(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "write_consolidated", fill_then_write)
    args = ["train", *FAST, "--train-data", TRAIN, "--output-dir", str(small_disk), "--experiment-name", "full",
            "--tokenizer", str(tokenizer_file), "--save-every-n-steps", "2", "--max-steps", "4",
            "--consolidate", "every"]  # fmt: skip
    proc = here(args, cwd=workdir)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "[E303] saving checkpoint step_00000002 failed" in proc.stderr and "No space left" in proc.stderr
    assert "no emergency checkpoint after CheckpointError: checkpoints cannot be written" in proc.stdout
    checkpoints = small_disk / "full" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir() if "step_" in p.name] == []  # the partial tag is gone, no retry
    assert not (small_disk / "full" / ".run.lock").exists()
