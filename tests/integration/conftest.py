"""Run the CLI and the DeepSpeed launcher as a user does: subprocesses on small files, CPU only."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TRAIN = str(EXAMPLES / "conversations.jsonl")
EVAL = str(EXAMPLES / "conversations_eval.jsonl")
# small and fast: 128-token rows, micro-batch 4, frequent logs
FAST = ["--preset", "debug", "--seq-len", "128", "--micro-batch-size", "4", "--log-every-n-steps", "1"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(ranks: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, 2 // ranks)), PYTHONUNBUFFERED="1")
    return env


def run(cmd: list[str], *, cwd: Path, ranks: int = 1, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=child_env(ranks), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n---stderr---\n")
    return proc


def lumina(args: list[str], *, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "lumina_ds", *args], cwd=cwd)


def deepspeed_launch(args: list[str], *, cwd: Path, ranks: int = 2) -> subprocess.CompletedProcess[str]:
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks)]
    launcher += ["--master_port", str(free_port()), str(ROOT / "launch" / "train.py")]
    return run(launcher + args, cwd=cwd, ranks=ranks)


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training log records, evaluation records) of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
