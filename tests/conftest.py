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

# the CI machine's 2 cores, shared by the test workers (pytest-xdist) that run at once
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))


@pytest.fixture(scope="session", autouse=True)
def _rank_server() -> Iterator[None]:
    yield
    stop_rank_server()


@pytest.fixture(autouse=True)
def _environment_as_found() -> Iterator[None]:
    """Each test leaves os.environ and torch's thread count as it found them: code under test sets rendezvous
    variables directly, which monkeypatch would not take back, and a later run in this process would read them; and
    starting several CPU ranks on a node divides the cores among them (distributed/env.py), which would change the
    reduction order, and so the last bits of the losses, of a later in-process run."""
    saved, threads = dict(os.environ), torch.get_num_threads()
    yield
    os.environ.clear()
    os.environ.update(saved)
    torch.set_num_threads(threads)


RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="session")
def _one_rank_group() -> tuple[DistInfo, dict[str, str]]:
    """This process as rank 0 of a one-rank gloo group, and the rendezvous variables it was started with; they are
    taken back at once, so that subprocesses start as they would from a shell."""
    from lumina_ds.distributed.env import init_distributed

    saved = dict(os.environ)
    info = init_distributed()
    variables = {name: os.environ[name] for name in RENDEZVOUS}
    os.environ.clear()
    os.environ.update(saved)
    return info, variables


@pytest.fixture
def process_group(_one_rank_group: tuple[DistInfo, dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> DistInfo:
    """For a test that builds DeepSpeed engines itself: the group, and its variables while the test runs (DeepSpeed
    reads LOCAL_RANK when it builds an engine)."""
    info, variables = _one_rank_group
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return info


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
