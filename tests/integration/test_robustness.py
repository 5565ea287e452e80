"""What happens to a run when things go wrong: signals, interrupted saves, corrupt checkpoints."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.conftest import FAST, TRAIN, child_env, lumina, read_metrics


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint(workdir: Path) -> None:
    cmd = [sys.executable, "-m", "lumina_ds", "train", *FAST, "--train-data", TRAIN, "--max-steps", "10000",
           "--experiment-name", "sig", "--save-every-n-steps", "100000"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=workdir, env=child_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = workdir / "runs" / "sig" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.monotonic() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]  # pre-empted, not finished: a requeue can tell
    assert "stop_reason=signal SIGTERM" in stdout
    logs, _ = read_metrics(workdir / "runs" / "sig")
    last = logs[-1]["step"]
    assert (workdir / "runs" / "sig" / "checkpoints" / f"step_{last:08d}" / "complete.json").exists()
    assert (workdir / "runs" / "sig" / "report.png").stat().st_size > 0  # a signal stop draws the run report too


def test_incomplete_tag_is_skipped_and_a_corrupt_one_falls_back(workdir: Path) -> None:
    base = ["train", *FAST, "--train-data", TRAIN, "--experiment-name", "ck", "--save-every-n-steps", "2"]
    assert lumina([*base, "--max-steps", "4"], cwd=workdir).returncode == 0
    checkpoints = workdir / "runs" / "ck" / "checkpoints"
    (checkpoints / "step_00000004" / "complete.json").unlink()  # as if killed mid-save
    resumed = lumina([*base, "--max-steps", "6", "--auto-resume"], cwd=workdir)
    assert resumed.returncode == 0 and "at step 2" in resumed.stdout

    # 4 KB of random bytes in the middle of the optimizer shard: it used to load silently
    shard = next((checkpoints / "step_00000006").glob("*optim_states.pt"))
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = random.Random(0).randbytes(4096)
    shard.write_bytes(bytes(data))
    strict = lumina([*base, "--max-steps", "8", "--auto-resume", "--strict-resume"], cwd=workdir)
    assert strict.returncode == 1 and "[E303]" in strict.stderr and "does not match its checksum" in strict.stderr
    fallback = lumina([*base, "--max-steps", "8", "--auto-resume"], cwd=workdir)
    assert fallback.returncode == 0
    assert "step_00000006 fails verification" in fallback.stdout and "at step 4" in fallback.stdout
    missing = lumina([*base, "--max-steps", "6", "--resume", str(workdir / "nowhere")], cwd=workdir)
    assert missing.returncode == 1 and "[E303]" in missing.stderr
