"""benchmarks/generation.py runs end to end at tiny sizes (no wall-clock assertions: benchmarks aren't tests)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.benchmarks.conftest import load_benchmark


def test_dry_run_compares_lumina_and_transformers_on_the_same_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "generation.jsonl"
    returned = load_benchmark("generation").main(["--dry-run", "--output", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == returned
    assert [(r["impl"], r["batch"], r["prompt_len"]) for r in records] == [
        ("lumina", 1, 8), ("transformers", 1, 8), ("lumina", 2, 8), ("transformers", 2, 8)
    ]  # fmt: skip
    assert all(r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in records)
    text = capsys.readouterr().out
    # the same weights decode the same greedy tokens: the weight mapping into transformers is exact
    assert "greedy tokens equal in 1/1 rows" in text and "greedy tokens equal in 2/2 rows" in text
    assert re.search(r"^ratio lumina / transformers tokens/s: \d+\.\d\dx$", text.strip().splitlines()[-1])
