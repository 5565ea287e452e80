"""Two CPU ranks through `lumina-ds train` (gloo): ZeRO 0-3 with AutoEP and the native MoE, exact resume where the
ranks' data positions differ, the consolidated weights against the engine's own evaluation, and elastic resume: a
checkpoint of 2 ranks with expert parallelism 2 continues on 1 process with EP 1 (ZeRO-2), and one of 1 process on 2
ranks with EP 2 (ZeRO-3). With `--grad-accum` keeping the global batch, every step after an elastic resume trains on
the rows the saved run's next step trained on, and the losses follow that run's.

One file: the two-rank jobs of tests/integration/conftest.py are trained once per test worker, and pytest-xdist
(--dist loadfile) runs a file's tests on one worker."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lumina_ds.data.loading.pipeline import eval_rows
from lumina_ds.data.prepare.tokenize import EncodeSettings
from lumina_ds.generation import load_for_inference
from lumina_ds.run_dir import WEIGHTS_FILE, list_complete_tags
from lumina_ds.training.tag_weights import ensure_weights
from lumina_ds.training.universal import reusable
from tests.integration.conftest import two_rank_run
from tests.runs import EVAL, FAST, TRAIN, here, losses, ranks, read_metrics


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


def check_run(run_dir: Path, *, grad_accum: int = 1) -> None:
    logs, evals = read_metrics(run_dir)
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.5  # it learns
    # every token of both ranks' micro-batches (4 rows x 128), routed to top-2 experts in each MoE layer
    assert all(sum(layer) == 2 * grad_accum * 4 * 128 * 2 for layer in logs[0]["expert_counts"])
    # the consolidated weights (experts gathered from both ranks, renamed) reproduce the engine's eval loss
    assert math.isclose(eval_loss_of_consolidated(run_dir), evals[-1]["eval_loss"], rel_tol=1e-4)


def test_zero3_autoep_ep2(zero3_ep2: Path) -> None:
    check_run(zero3_ep2)
    assert (zero3_ep2 / "checkpoints" / "step_00000012" / "zero_pp_rank_1_mp_rank_00_model_states.pt").exists()


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_rank_resume_is_exact_where_the_ranks_data_positions_differ(
    stage: int, request: pytest.FixtureRequest, tokenizer_file: Path, workdir: Path
) -> None:
    """Only rank 0's position used to be saved (and at ZeRO 0-2 read by every rank): rank 1 skipped or repeated. The
    position is now one global row, the same in every rank's file, from which each rank takes its micro-batches."""
    full = request.getfixturevalue({0: "zero0", 2: "zero2_ep2", 3: "zero3_ep2"}[stage])
    steps = max(losses(full))
    tag = full / "checkpoints" / "step_00000004"
    positions = [json.loads((tag / "lumina_state" / f"rank{r:05d}.json").read_text())["data"] for r in (0, 1)]
    # 4 steps x 2 ranks x 4 rows: the 32nd row of the first epoch, whichever rank saved it (rank 1's rows of the
    # next step are rows 36-39, not rows of rank 1's own document share as before)
    assert [(p["epoch"], p["row"]) for p in positions] == [(0, 32), (0, 32)]
    flags = json.loads((full / "ds_config.json").read_text())
    ep = ["--expert-parallel-size", "2"] if stage else []
    resumed = two_rank_run(workdir, "resumed", tokenizer_file, ["--zero-stage", str(stage), "--precision", "fp32",
                           *ep, "--max-steps", str(steps), "--resume", str(tag)])  # fmt: skip
    assert flags["zero_optimization"]["stage"] == stage
    got, expected = losses(resumed), losses(full)
    assert sorted(got) == list(range(5, steps + 1))
    assert all(math.isclose(got[s], expected[s], abs_tol=1e-5) for s in got), (got, expected)


def test_zero2_native_moe_ep2(two_rank_root: Path, tokenizer_file: Path) -> None:
    run_dir = two_rank_run(two_rank_root, "native", tokenizer_file, ["--zero-stage", "2", "--expert-parallel-size",
                           "2", "--moe-backend", "native", "--deterministic-gating", "--max-steps", "12",
                           "--eval-data", EVAL, "--eval-every-n-steps", "12", "--grad-accum", "2"])  # fmt: skip
    check_run(run_dir, grad_accum=2)
    tag = run_dir / "checkpoints" / "step_00000012"
    assert len(list(tag.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))) == 2 * 4  # 2 layers x 4 experts


def test_zero3_autoep_bf16_with_activation_checkpointing(two_rank_root: Path, tokenizer_file: Path) -> None:
    # moe recompute: backward re-runs AutoEP's replacement block, gathering its ZeRO-3 expert partitions again
    run_dir = two_rank_run(two_rank_root, "bf16", tokenizer_file, ["--zero-stage", "3", "--expert-parallel-size", "2",
                           "--precision", "bf16", "--max-steps", "2", "--eval-data", EVAL, "--eval-every-n-steps",
                           "2", "--activation-checkpointing", "moe"])  # fmt: skip
    logs, evals = read_metrics(run_dir)
    assert len(logs) == 2 and all(math.isfinite(r["loss"]) for r in logs)
    # bf16 weights: the consolidated model (loaded in fp32) agrees with the engine to bf16 precision
    assert math.isclose(eval_loss_of_consolidated(run_dir), evals[-1]["eval_loss"], rel_tol=2e-2)


def test_autoep_ep2_trains_exactly_like_our_block_at_ep1(two_rank_root: Path, tokenizer_file: Path) -> None:
    """AutoEP replaces our MoE block with its own router, grouped experts and all-to-all: same math, same losses."""
    common = ["--zero-stage", "1", "--max-steps", "6", "--eval-data", EVAL, "--eval-every-n-steps", "6"]
    own = two_rank_run(two_rank_root, "ep1", tokenizer_file, [*common, "--expert-parallel-size", "1"])
    # with the MoE sub-block recomputed: the checkpoint wraps AutoEP's module, found in the block at call time
    autoep = two_rank_run(two_rank_root, "ep2", tokenizer_file, [*common, "--expert-parallel-size", "2",
                          "--activation-checkpointing", "moe"])  # fmt: skip
    (own_logs, own_evals), (ep_logs, ep_evals) = read_metrics(own), read_metrics(autoep)
    for a, b in zip(own_logs, ep_logs, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
        assert a["expert_counts"] == b["expert_counts"]  # the router hook sees the same routing after replacement
    assert abs(own_evals[-1]["eval_loss"] - ep_evals[-1]["eval_loss"]) < 1e-5


# ---- elastic resume ------------------------------------------------------------------------------------------
TOLERANCE = 1e-3  # fp32; the sums over ranks and micro-batches are ordered differently on the other world size


def common(tokenizer: Path) -> list[str]:
    return [*FAST, "--train-data", TRAIN, "--precision", "fp32", "--max-steps", "8", "--no-progress-bar",
            "--tokenizer", str(tokenizer)]  # fmt: skip


def assert_follows(resumed: Path, original: Path) -> None:
    got, expected = losses(resumed), losses(original)
    assert sorted(got) == [5, 6, 7, 8]
    assert all(abs(got[s] - expected[s]) <= TOLERANCE for s in got), (got, expected)


def test_two_ranks_with_ep_2_resume_on_one_process_with_ep_1(
    zero2_ep2: Path, tokenizer_file: Path, workdir: Path
) -> None:
    tag = zero2_ep2 / "checkpoints" / "step_00000004"
    again = ["train", *common(tokenizer_file), "--zero-stage", "2", "--experiment-name", "b", "--resume", str(tag)]
    one = here([*again, "--grad-accum", "2", "--save-every-n-steps", "100"], cwd=workdir)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "saved by 2 process(es), expert-parallel size 2; this run has 1 process(es), expert-parallel size 1" in (
        one.stdout
    )
    assert "not exact" not in one.stdout
    assert_follows(workdir / "runs" / "b", zero2_ep2)

    # the conversion is verified and reused; half the global batch is said in one line, and the run goes on, and a
    # rewind to a tag of its own (a plain checkpoint, in an engine built to load a universal one) works
    universal = workdir / "runs" / "b" / "checkpoints" / ".universal" / "step_00000004"
    assert reusable(universal, tag) is None
    halved = here([*again, "--grad-accum", "1", "--max-steps", "9", "--save-every-n-steps", "1"], cwd=workdir,
                  faults="nan_loss@6,nan_loss@7,nan_loss@8")  # fmt: skip
    assert halved.returncode == 0 and "reusing the verified universal checkpoint" in halved.stdout
    notes = [line for line in halved.stdout.splitlines() if "not exact" in line]
    assert len(notes) == 1 and "from 8 rows" in notes[0] and "--grad-accum 2 keeps 8" in notes[0]
    rewound = re.search(r"rewound to step (\d+) ", halved.stdout)
    assert rewound and int(rewound.group(1)) >= 5  # to a tag this run saved, not to the converted one
    shard = next((universal / "zero").rglob("exp_avg.pt"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert "does not match its checksum" in str(reusable(universal, tag))  # a damaged conversion is made again


def test_one_process_resumes_on_two_ranks_with_ep_2_at_zero_3(workdir: Path, tokenizer_file: Path) -> None:
    saved = ["train", *common(tokenizer_file), "--zero-stage", "3", "--grad-accum", "2", "--save-every-n-steps", "4"]
    first = here([*saved, "--experiment-name", "a"], cwd=workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    tag = workdir / "runs" / "a" / "checkpoints" / "step_00000004"
    two = ranks(["train", *common(tokenizer_file), "--zero-stage", "3", "--expert-parallel-size", "2",
                 "--experiment-name", "b", "--resume", str(tag)], cwd=workdir)  # fmt: skip
    assert two.returncode == 0 and "this run has 2 process(es), expert-parallel size 2" in two.stdout, two.stderr[
        -3000:
    ]
    assert_follows(workdir / "runs" / "b", workdir / "runs" / "a")
    final = json.loads((workdir / "runs" / "b" / "checkpoints" / "step_00000008" / "complete.json").read_text())
    assert final["world_size"] == 2  # the resumed run saves ordinary tags of its own size


@pytest.mark.parametrize("run", ["zero0", "zero2_ep2", "zero3_ep2"])
def test_the_last_tags_weights_written_again_from_its_deepspeed_files_are_identical(
    run: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """What chat, export and --init-from do with a tag saved without consolidated weights (--consolidate final):
    ZeRO-0 reads DeepSpeed's model states, ZeRO-2/3 with AutoEP experts on two ranks its universal conversion; the
    result equals the consolidation the save itself wrote, tensor for tensor."""
    source: Path = request.getfixturevalue(run)
    copy = tmp_path / run
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns(".run.lock", ".universal"))
    tag = copy / "checkpoints" / list_complete_tags(copy / "checkpoints")[-1]
    expected = load_file(str(tag / WEIGHTS_FILE))
    (tag / WEIGHTS_FILE).unlink()
    ensure_weights(tag, log=lambda _: None)
    got = load_file(str(tag / WEIGHTS_FILE))
    assert list(got) == list(expected)
    assert all(got[n].dtype == t.dtype and torch.equal(got[n], t) for n, t in expected.items())
