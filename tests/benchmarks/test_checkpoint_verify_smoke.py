"""benchmarks/checkpoint_verify.py runs and measures the digest complete.json records."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.benchmarks.conftest import BENCHMARKS


def test_checkpoint_verify_reports_both_hashes_per_gib(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "checkpoint_verify.py"), "--gib", "0.02",
                           "--dir", str(tmp_path)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = re.findall(r"^\s+(\S+)\s+cold\s+([\d.]+) s\s+warm\s+([\d.]+) s\s+in memory\s+([\d.]+) s$", proc.stdout, re.M)
    assert [name for name, *_ in rows] == ["xxh3_128", "blake2b"]
    assert all(float(v) > 0 for _, *values in rows for v in values)
    assert list(tmp_path.iterdir()) == []  # the test file is removed
