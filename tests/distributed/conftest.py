"""Helpers for tests that need a real (one-process, CPU) DeepSpeed process group."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def run_single_rank(script: str, *, cwd: Path, timeout: int, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """Run `script` as rank 0 of 1 on a free port, in a fresh interpreter (DeepSpeed picks its accelerator once)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), PYTHONPATH=str(ROOT), **extra_env)  # fmt: skip
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
