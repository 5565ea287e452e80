"""The learning benchmark runs end to end on a tiny budget (no loss thresholds: 2 steps teach nothing reliable)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from tests.benchmarks.conftest import load_benchmark

TINY = ["--steps", "2", "--seeds", "1", "--eval-every", "1", "--eval-rows", "2", "--batch-size", "2",
        "--seq-len", "32", "--max-chats", "40", "--threads", "2"]  # fmt: skip


def test_both_models_train_on_the_same_batches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    learning = load_benchmark("learning")
    out = tmp_path / "learning.json"
    results = learning.main([*TINY, "--init-schemes", "scaled,normal", "--output", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    same = next(line for line in lines if line.startswith("same weights"))
    assert float(same.rsplit(" ", 1)[1]) < 1e-5  # the 4D document mask and position ids reach transformers
    assert re.fullmatch(r"eval loss gap lumina vs transformers: [+-]\d+\.\d\d% \(1 seeds\)", lines[-1])
    assert list(results[0]) == ["lumina[scaled]", "lumina[normal]", "transformers"]
    saved = json.loads(out.read_text())["results"][0]
    for curve in saved.values():
        assert list(curve) == ["0", "1", "2"] and all(math.isfinite(v) for v in curve.values())
    # same seed, same constructor draws: the schemes start from different weights, so their first eval differs
    assert saved["lumina[scaled]"]["0"] != saved["lumina[normal]"]["0"]


def test_aux_coefficient_matches_ours_at_uniform_routing() -> None:
    """transformers' aux loss is top_k x ours when routing is uniform: its coefficient is ours / top_k."""
    import torch
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from lumina_ds.models.config import ModelConfig, MoEConfig
    from lumina_ds.models.moe import router_statistics

    learning = load_benchmark("learning")
    model = ModelConfig(moe=MoEConfig(num_experts=4, top_k=2, load_balancing_weight=0.01))
    logits = torch.zeros(64, 4)
    logits[torch.arange(64), torch.arange(64) % 4] = 1.0  # each expert first for a quarter, second picks spread
    logits[torch.arange(64), (torch.arange(64) + 1) % 4] = 0.5
    ours = router_statistics(logits, 2)[0]
    theirs = load_balancing_loss_func((logits, logits), 4, 2)
    assert float(ours) == pytest.approx(1.0) and float(theirs) == pytest.approx(2.0)
    assert learning.hf_aux_coefficient(model) * float(theirs) == pytest.approx(0.01 * float(ours))
