"""Process-group start on CPU: DeepSpeed's shared-memory allreduce op is neither built nor started."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from torch.utils.cpp_extension import _get_build_directory

from tests.integration.conftest import free_port

SCRIPT = textwrap.dedent(
    """
    import deepspeed.comm.comm as ds_comm
    from lumina_ds.distributed.env import init_distributed

    info = init_distributed()
    assert ds_comm.cdb.shm_comm_op is None
    print("OK", info.rank, info.world_size)
    """
)


def test_cpu_start_ignores_a_stale_build_lock_and_leaves_no_shared_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank killed while torch held the op's build lock leaves the lock file, and every later load of the op waits
    for it forever (what hung CI). Without the op there is nothing to wait for, and no ~66 MiB /dev/shm buffer that
    DeepSpeed would never unlink."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    (Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock").touch()
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*"))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK 0 1" in proc.stdout
    assert set(shm.glob("deepspeed_allreduce_buffer_*")) - before == set()
