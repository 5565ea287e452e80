"""What happens to a run when things go wrong: signals, interrupted saves, corrupt checkpoints."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

from tests.runs import FAST, TRAIN, here, read_metrics, start_ranks


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint(workdir: Path, tokenizer_file: Path) -> None:
    group = start_ranks(["train", *FAST, "--train-data", TRAIN, "--tokenizer", str(tokenizer_file), "--max-steps",
                         "10000", "--experiment-name", "sig", "--save-every-n-steps", "100000"], cwd=workdir,
                        n=1)  # fmt: skip
    metrics = workdir / "runs" / "sig" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(group.processes[0].pid, signal.SIGTERM)
    done = group.wait()
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]  # pre-empted, not finished: a requeue can tell
    assert "stop_reason=signal SIGTERM" in done.stdout
    logs, _ = read_metrics(workdir / "runs" / "sig")
    last = logs[-1]["step"]
    tag = workdir / "runs" / "sig" / "checkpoints" / f"step_{last:08d}"
    assert (tag / "complete.json").exists()
    assert not (tag / "model.safetensors").exists()  # the signal's time goes to what the next launch needs
    assert "a stop signal must come at least" in done.stdout  # the lead it measured, printed after that save
    assert (workdir / "runs" / "sig" / "report.png").stat().st_size > 0  # a signal stop draws the run report too


def test_incomplete_tag_is_skipped_and_a_corrupt_one_falls_back(copied_run: Path, workdir: Path) -> None:
    base = ["train", *FAST, "--train-data", TRAIN, "--experiment-name", "shared", "--save-every-n-steps", "2"]
    checkpoints = copied_run / "checkpoints"
    (checkpoints / "step_00000012" / "complete.json").unlink()  # as if killed mid-save
    resumed = here([*base, "--max-steps", "14", "--auto-resume"], cwd=workdir)
    assert resumed.returncode == 0 and "at step 10" in resumed.stdout, resumed.stderr[-3000:]

    # 4 KB of random bytes in the middle of the optimizer shard: it used to load silently
    shard = next((checkpoints / "step_00000014").glob("*optim_states.pt"))
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = random.Random(0).randbytes(4096)
    shard.write_bytes(bytes(data))
    strict = here([*base, "--max-steps", "16", "--auto-resume", "--strict-resume"], cwd=workdir)
    assert strict.returncode == 1 and "[E303]" in strict.stderr and "does not match its checksum" in strict.stderr
    fallback = here([*base, "--max-steps", "16", "--auto-resume"], cwd=workdir)
    assert fallback.returncode == 0
    assert "step_00000014 fails verification" in fallback.stdout and "at step 12" in fallback.stdout
    missing = here([*base, "--max-steps", "6", "--resume", str(workdir / "nowhere")], cwd=workdir)
    assert missing.returncode == 1 and "[E303]" in missing.stderr
