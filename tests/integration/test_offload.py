"""ZeRO-Offload is a run-config decision: DeepSpeed's CPU Adam steps the host-resident states, in pure bf16 (bf16
moments) and in mixed bf16 (fp32 moments). torch's AdamW there was 5-7x slower, and DeepSpeed refuses it for pure
bf16. The first use JIT-builds DeepSpeed's cpu_adam op (about 50 s on 2 cores), cached for later runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.runs import FAST, TRAIN, here, read_metrics


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "offload"), [("bf16", "optimizer+params"), ("mixed_bf16", "optimizer")])
def test_zero3_offload_trains_with_cpu_adam(workdir: Path, tokenizer_file: Path, precision: str, offload: str) -> None:
    name = f"offload_{precision}"
    args = ["train", *FAST, "--train-data", TRAIN, "--max-steps", "6", "--zero-stage", "3", "--offload", offload,
            "--precision", precision, "--experiment-name", name, "--no-progress-bar", "--tokenizer",
            str(tokenizer_file)]  # fmt: skip
    proc = here(args, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = "bf16" if precision == "bf16" else "fp32"
    assert f"offload {offload} | optimizer DeepSpeedCPUAdam ({states} states on the host)" in proc.stdout
    run_dir = workdir / "runs" / name
    losses = [r["loss"] for r in read_metrics(run_dir)[0]]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.3
    record = json.loads((run_dir / "ds_config.json").read_text())
    assert record["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ("offload_param" in record["zero_optimization"]) == (offload == "optimizer+params")
    assert record["lumina_ds"]["optimizer"].startswith("DeepSpeedCPUAdam")
