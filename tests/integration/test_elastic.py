"""Elastic resume through the CLI: a checkpoint of 2 ranks with expert parallelism 2 continues on 1 process with EP 1
(ZeRO-2), and one of 1 process on 2 ranks with EP 2 (ZeRO-3). With `--grad-accum` keeping the global batch, every
step after the resume trains on the rows the saved run's next step trained on, and the losses follow that run's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lumina_ds.training.universal import reusable
from tests.runs import FAST, TRAIN, here, losses, ranks

TOLERANCE = 1e-3  # fp32; the sums over ranks and micro-batches are ordered differently on the other world size

# the two-rank jobs of tests/integration/conftest.py are trained once, on the worker that runs these tests
pytestmark = pytest.mark.xdist_group("two_rank_jobs")


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
