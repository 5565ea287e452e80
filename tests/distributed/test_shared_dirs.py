"""Two ranks that do not share a run directory (per-node disks at the same path) stop together with E003 before any
work; a shared prepared-shard cache is built once for the job, a per-node one once per node."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.distributed.conftest import ROOT
from tests.integration.conftest import child_env, free_port

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch.distributed as dist
    import torch.multiprocessing as mp

    def worker(rank, root, port):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        from lumina_ds.distributed.collectives import shared_by_all_ranks
        from lumina_ds.distributed.env import DistInfo
        from lumina_ds.errors import LuminaError
        from lumina_ds.training.session import check_run_dir_shared, shard_builder
        import torch

        root = Path(root)
        info = DistInfo(rank=rank, local_rank=0, world_size=2, local_world_size=1, device=torch.device("cpu"))
        own = root / f"node{rank}"  # as if each rank were on its own node with its own disk at one path
        result = {
            "same": shared_by_all_ranks(root / "shared", rank=rank),
            "own": shared_by_all_ranks(own, rank=rank),
            "builds_shared": shard_builder(root / "prepared", info),
            "builds_own": shard_builder(own / "prepared", info),
            "probes_left": sorted(p.name for p in root.rglob(".lumina-shared-check-*")),
        }
        try:
            check_run_dir_shared(own, info)
        except LuminaError as exc:
            result["error"] = exc.code
        (root / f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.start_processes(worker, args=(sys.argv[1], int(sys.argv[2])), nprocs=2, start_method="spawn")
    """
)


@pytest.mark.slow
def test_unshared_run_dir_is_e003_on_every_rank_and_shards_are_built_once(tmp_path: Path) -> None:
    script = tmp_path / "check.py"
    script.write_text(SCRIPT)
    env = {**child_env(2), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(free_port())], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, result in enumerate(results):
        assert result["same"] is True and result["own"] is False
        assert result["error"] == "E003"  # every rank raises, none is left waiting in a collective
        assert result["builds_shared"] is (rank == 0)  # one build for the job
        assert result["builds_own"] is True  # local rank 0 of each "node"
        assert result["probes_left"] == []
