"""Two-rank jobs several tests read: each is trained once per session, on first use, as ranks forked from the warm
server (tests/runs.py), with the shared run's tokenizer (so that no job trains its own)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.runs import EVAL, FAST, TRAIN, ranks

TWO_RANK = [*FAST, "--train-data", TRAIN, "--no-progress-bar"]


def two_rank_run(root: Path, name: str, tokenizer: Path, extra: list[str]) -> Path:
    done = ranks(["train", *TWO_RANK, "--tokenizer", str(tokenizer), "--experiment-name", name, *extra], cwd=root)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return root / "runs" / name


@pytest.fixture(scope="session")
def two_rank_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("two_ranks")


@pytest.fixture(scope="session")
def tokenizer_file(shared_run: Path) -> Path:
    return shared_run / "tokenizer.json"


@pytest.fixture(scope="session")
def zero3_ep2(two_rank_root: Path, tokenizer_file: Path) -> Path:
    """ZeRO-3, AutoEP with expert-parallel size 2, fp32: 12 steps, tags 4, 8, 12, one evaluation at the end."""
    return two_rank_run(two_rank_root, "z3", tokenizer_file, ["--zero-stage", "3", "--expert-parallel-size", "2",
                        "--precision", "fp32", "--max-steps", "12", "--save-every-n-steps", "4", "--eval-data", EVAL,
                        "--eval-every-n-steps", "12"])  # fmt: skip


@pytest.fixture(scope="session")
def zero2_ep2(two_rank_root: Path, tokenizer_file: Path) -> Path:
    """ZeRO-2, AutoEP with expert-parallel size 2, fp32: 8 steps, tags 4 and 8 (the elastic resume's source)."""
    return two_rank_run(two_rank_root, "z2", tokenizer_file, ["--zero-stage", "2", "--expert-parallel-size", "2",
                        "--precision", "fp32", "--max-steps", "8", "--save-every-n-steps", "4"])  # fmt: skip


@pytest.fixture(scope="session")
def zero0(two_rank_root: Path, tokenizer_file: Path) -> Path:
    """ZeRO-0 (plain data parallelism), fp32: 8 steps, tags 4 and 8."""
    return two_rank_run(two_rank_root, "z0", tokenizer_file, ["--zero-stage", "0", "--precision", "fp32",
                        "--max-steps", "8", "--save-every-n-steps", "4"])  # fmt: skip
