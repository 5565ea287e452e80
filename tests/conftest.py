"""Suite-wide settings and the runs many tests share.

Every training run a test starts goes through the command line a user types: in this process when one process is
enough (no interpreter start, no imports), or as ranks forked from a server that imported torch and DeepSpeed once
(tests/runs.py). The trained run below is shared by the tests that only read a finished run, and copied by those that
change one."""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports DeepSpeed (it picks an accelerator once)

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lumina_ds.distributed.env import DistInfo
from tests.runs import EVAL, FAST, SHARED_RUN, TRAIN, here, stop_rank_server

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _rank_server() -> Iterator[None]:
    yield
    stop_rank_server()


@pytest.fixture(scope="session")
def process_group() -> Iterator[DistInfo]:
    """This process as rank 0 of a one-rank gloo group, for tests that build DeepSpeed engines themselves; the
    rendezvous variables it sets are taken back so that later subprocesses start as they would from a shell."""
    from lumina_ds.distributed.env import init_distributed

    saved = dict(os.environ)
    info = init_distributed()
    os.environ.clear()
    os.environ.update(saved)
    yield info


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished `debug` run, read-only: tokenizer trained by the run, 12 steps logged each step, tags every 2
    steps (all kept), evaluation every 4 steps. Copy it (`copied_run`) before changing anything in it."""
    workdir = tmp_path_factory.mktemp("shared")
    done = here(["train", *FAST, "--train-data", TRAIN, "--eval-data", EVAL, *SHARED_RUN, "--experiment-name",
                 "shared"], cwd=workdir)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "run report:" in done.stdout
    return workdir / "runs" / "shared"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Where a test runs lumina-ds (its runs/ and prepared data go here)."""
    return tmp_path


@pytest.fixture
def copied_run(shared_run: Path, tmp_path: Path) -> Path:
    """A copy of the shared run under this test's own output dir (tmp_path/runs/shared)."""
    target = tmp_path / "runs" / "shared"
    shutil.copytree(shared_run, target, ignore=shutil.ignore_patterns(".run.lock"))
    return target
