"""The attention-path check runs end to end on CPU at tiny sizes (no wall-clock assertions: benchmarks aren't tests)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.benchmarks.conftest import load_benchmark

TINY = [
    "--seq-lens", "48", "--batch-size", "2", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
    "--steps", "1", "--warmup", "1", "--threads", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def check() -> ModuleType:
    return load_benchmark("attention_check")


def test_cpu_run_compares_sdpa_and_flex_and_skips_flash(
    check: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "attention.jsonl"
    returned = check.main([*TINY, "--output", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["path"], r["precision"]) for r in records] == [(r["path"], r["precision"]) for r in returned]
    rows = {(r["path"], r["precision"]): r for r in records}
    assert len(rows) == 8  # 4 paths x 2 precisions at one length
    for precision in ("fp32", "bf16"):
        assert "flash-attn" in rows["flash-varlen", precision]["skipped"]  # CPU: never runs here
        for path in ("sdpa-causal", "sdpa+mask", "flex"):
            r = rows[path, precision]
            assert r["pass"] == "fwd" and r["tokens_per_s"] > 0 and r["peak_extra_bytes"] is None
            assert r["seq_len"] == 48 and r["max_abs_err_grad"] is None  # no CPU backward for flex
    assert rows["sdpa+mask", "fp32"]["max_abs_err_out"] == 0.0  # the reference itself
    assert rows["flex", "fp32"]["max_abs_err_out"] < 1e-5
    # bf16 inputs and outputs round to 8 mantissa bits: errors ~1e-2 on unit-scale values, not more
    assert 0 < rows["flex", "bf16"]["max_abs_err_out"] < 0.1
    assert 0 < rows["sdpa+mask", "bf16"]["max_abs_err_out"] < 0.1
    assert rows["sdpa-causal", "fp32"]["max_abs_err_out"] is None  # ignores documents: speed reference only
    table = capsys.readouterr().out
    assert "flex" in table and "skipped flash-varlen bf16: flash-attn is not installed" in table


def test_packed_positions_have_the_requested_documents(check: ModuleType) -> None:
    gen = torch.Generator().manual_seed(0)
    pos, used = check.packed_positions(5, 64, 4, gen)
    assert pos.shape == (5, 64) and len(used) == 5
    for row, n in zip(pos.tolist(), used, strict=True):
        assert 64 - 64 // 16 <= n <= 64  # at most S/16 padding tokens
        assert row[n:] == [0] * (64 - n)  # padding: position 0, as the packer writes it
        assert row[0] == 0 and sum(p == 0 for p in row[:n]) == 4  # exactly 4 documents start in the used part
        assert all(b == 0 or b == a + 1 for a, b in itertools.pairwise(row[:n]))  # counting up inside
