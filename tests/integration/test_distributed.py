"""Two CPU ranks through the real entry point (deepspeed launcher + launch/train.py), gloo backend."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lumina_ds.data.loading.pipeline import eval_rows
from lumina_ds.data.prepare.tokenize import EncodeSettings
from lumina_ds.generation import load_for_inference
from tests.integration.conftest import EVAL, FAST, TRAIN, deepspeed_launch, read_metrics

pytestmark = pytest.mark.slow


def eval_loss_of_consolidated(run_dir: Path) -> float:
    """Token-weighted eval loss of the saved model.safetensors in one plain process (no DeepSpeed)."""
    bundle = load_for_inference(run_dir)
    rows, _ = eval_rows(Path(EVAL), EncodeSettings.of(bundle.tokenizer), seq_len=128, pad_id=bundle.tokenizer.pad_id)
    total, targets = 0.0, 0
    with torch.no_grad():
        for i in range(len(rows)):
            ids, labels, pos = (
                torch.from_numpy(a[i : i + 1]).long() for a in (rows.input_ids, rows.labels, rows.position_ids)
            )
            out = bundle.model(ids, labels=labels, position_ids=pos)
            n = int(out["num_targets"])
            total, targets = total + float(out["lm_loss"]) * n, targets + n
    return total / targets


def train_two_ranks(workdir: Path, name: str, extra: list[str]) -> Path:
    args = [*FAST, "--train-data", TRAIN, "--eval-data", EVAL, "--experiment-name", name, "--output-dir", "runs"]
    proc = deepspeed_launch([*args, *extra], cwd=workdir)
    assert proc.returncode == 0
    return workdir / "runs" / name


def check_run(run_dir: Path, *, grad_accum: int = 1) -> None:
    logs, evals = read_metrics(run_dir)
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.5  # it learns
    # every token of both ranks' micro-batches (4 rows x 128), routed to top-2 experts in each MoE layer
    assert all(sum(layer) == 2 * grad_accum * 4 * 128 * 2 for layer in logs[0]["expert_counts"])
    # the consolidated weights (experts gathered from both ranks, renamed) reproduce the engine's eval loss
    assert math.isclose(eval_loss_of_consolidated(run_dir), evals[-1]["eval_loss"], rel_tol=1e-4)


def test_zero3_autoep_ep2(workdir: Path) -> None:
    run_dir = train_two_ranks(workdir, "z3", ["--zero-stage", "3", "--expert-parallel-size", "2", "--max-steps", "12",
                                              "--eval-every-n-steps", "12"])  # fmt: skip
    check_run(run_dir)
    assert (run_dir / "checkpoints" / "step_00000012" / "zero_pp_rank_1_mp_rank_00_model_states.pt").exists()


def test_zero2_native_moe_ep2(workdir: Path) -> None:
    run_dir = train_two_ranks(workdir, "native", ["--zero-stage", "2", "--expert-parallel-size", "2", "--moe-backend",
                                                  "native", "--deterministic-gating", "--max-steps", "12",
                                                  "--eval-every-n-steps", "12", "--grad-accum", "2"])  # fmt: skip
    check_run(run_dir, grad_accum=2)
    tag = run_dir / "checkpoints" / "step_00000012"
    assert len(list(tag.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))) == 2 * 4  # 2 layers x 4 experts


def test_resume_reproduces_uninterrupted_run(workdir: Path) -> None:
    common = ["--zero-stage", "3", "--expert-parallel-size", "2", "--max-steps", "10", "--eval-every-n-steps", "100"]
    full = train_two_ranks(workdir, "full", [*common, "--save-every-n-steps", "5"])
    resumed = train_two_ranks(workdir, "resumed", [*common, "--resume", str(full / "checkpoints" / "step_00000005")])
    full_logs, _ = read_metrics(full)
    resumed_logs, _ = read_metrics(resumed)
    assert [r["step"] for r in resumed_logs] == [6, 7, 8, 9, 10]
    for a, b in zip(full_logs[5:], resumed_logs, strict=True):
        assert a["step"] == b["step"]
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a["step"], a["loss"], b["loss"])


def test_zero3_autoep_bf16_with_activation_checkpointing(workdir: Path) -> None:
    # moe recompute: backward re-runs AutoEP's replacement block, gathering its ZeRO-3 expert partitions again
    run_dir = train_two_ranks(workdir, "bf16", ["--zero-stage", "3", "--expert-parallel-size", "2", "--precision",
                                                "bf16", "--max-steps", "4", "--eval-every-n-steps", "4",
                                                "--activation-checkpointing", "moe"])  # fmt: skip
    logs, evals = read_metrics(run_dir)
    assert len(logs) == 4 and all(math.isfinite(r["loss"]) for r in logs)
    # bf16 weights: the consolidated model (loaded in fp32) agrees with the engine to bf16 precision
    assert math.isclose(eval_loss_of_consolidated(run_dir), evals[-1]["eval_loss"], rel_tol=2e-2)


def test_autoep_ep2_trains_exactly_like_our_block_at_ep1(workdir: Path) -> None:
    """AutoEP replaces our MoE block with its own router, grouped experts and all-to-all: same math, same losses."""
    common = ["--zero-stage", "1", "--max-steps", "6", "--eval-every-n-steps", "6"]
    own = train_two_ranks(workdir, "ep1", [*common, "--expert-parallel-size", "1"])
    # with the MoE sub-block recomputed: the checkpoint wraps AutoEP's module, found in the block at call time
    autoep = train_two_ranks(workdir, "ep2", [*common, "--expert-parallel-size", "2", "--activation-checkpointing",
                                              "moe"])  # fmt: skip
    (own_logs, own_evals), (ep_logs, ep_evals) = read_metrics(own), read_metrics(autoep)
    for a, b in zip(own_logs, ep_logs, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
        assert a["expert_counts"] == b["expert_counts"]  # the router hook sees the same routing after replacement
    assert abs(own_evals[-1]["eval_loss"] - ep_evals[-1]["eval_loss"]) < 1e-5
