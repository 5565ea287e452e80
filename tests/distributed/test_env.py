"""Process-group start on CPU: DeepSpeed's shared-memory allreduce op is neither built nor started, and the timeout
reaches the process group. Each starts a fresh rank (a process forked from the test server, tests/runs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lumina_ds.distributed.env import SHM_COMM_OP
from lumina_ds.planning.environment import torch_extensions_dir
from tests.runs import call_on_ranks


def start_and_check_no_shm_op() -> None:
    import deepspeed.comm.comm as ds_comm

    from lumina_ds.distributed.env import init_distributed

    info = init_distributed()
    assert ds_comm.cdb.shm_comm_op is None
    print("OK", info.rank, info.world_size)


def start_with_a_timeout_of_7_minutes() -> None:
    import torch
    import torch.distributed as dist

    from lumina_ds.distributed.env import init_distributed

    init_distributed(timeout_minutes=7)
    backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    print("TIMEOUT", backend.options._timeout.total_seconds())


def test_cpu_start_ignores_a_stale_build_lock_and_leaves_no_shared_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank killed while torch held the op's build lock leaves the lock file, and every later load of the op waits
    for it forever (what hung CI). Without the op there is nothing to wait for, and no ~66 MiB /dev/shm buffer that
    DeepSpeed would never unlink."""
    extensions = tmp_path / "extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    op_dir = torch_extensions_dir() / SHM_COMM_OP
    op_dir.mkdir(parents=True)
    (op_dir / "lock").touch()
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*"))
    proc = call_on_ranks(start_and_check_no_shm_op, cwd=tmp_path, n=1,
                         env={"TORCH_EXTENSIONS_DIR": str(extensions), "LOCAL_SIZE": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK 0 1" in proc.stdout
    assert set(shm.glob("deepspeed_allreduce_buffer_*")) - before == set()


def test_the_timeout_reaches_the_process_group(tmp_path: Path) -> None:
    """DeepSpeed's default is 10 minutes on NCCL: ranks waiting while rank 0 trains a tokenizer would be aborted."""
    proc = call_on_ranks(start_with_a_timeout_of_7_minutes, cwd=tmp_path, n=1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TIMEOUT 420.0" in proc.stdout
