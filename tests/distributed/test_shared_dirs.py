"""Two ranks that do not share a run directory (per-node disks at the same path) stop together with E003 before any
work; a shared prepared-shard cache is built once for the job, a per-node one once per node."""

from __future__ import annotations

import json
from pathlib import Path

from tests.runs import call_on_ranks


def check_dirs(root_text: str) -> None:
    """One of two ranks, each as if on its own node with its own disk at one path (`own`)."""
    import torch

    from lumina_ds.data.train_data import DataWorld, shard_builder
    from lumina_ds.distributed.collectives import shared_by_all_ranks
    from lumina_ds.distributed.env import DistInfo, barrier, init_distributed
    from lumina_ds.errors import LuminaError
    from lumina_ds.training.session import check_run_dir_shared

    rank = init_distributed().rank
    root = Path(root_text)
    info = DistInfo(rank=rank, local_rank=0, world_size=2, local_world_size=1, device=torch.device("cpu"))
    world = DataWorld(rank=rank, world_size=2, local_rank=0, local_world_size=1,
                      shared=lambda path: shared_by_all_ranks(path, rank=rank), log=lambda _: None)  # fmt: skip
    own = root / f"node{rank}"
    result: dict[str, object] = {
        "same": shared_by_all_ranks(root / "shared", rank=rank),
        "own": shared_by_all_ranks(own, rank=rank),
        "builds_shared": shard_builder(root / "prepared", world),
        "builds_own": shard_builder(own / "prepared", world),
    }
    barrier()  # every rank's checks are done: none may have left its probe file behind
    result["probes_left"] = sorted(p.name for p in root.rglob(".lumina-shared-check-*"))
    try:
        check_run_dir_shared(own, info)
    except LuminaError as exc:
        result["error"] = exc.code
    (root / f"rank{rank}.json").write_text(json.dumps(result))


def test_unshared_run_dir_is_e003_on_every_rank_and_shards_are_built_once(tmp_path: Path) -> None:
    proc = call_on_ranks(check_dirs, str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, result in enumerate(results):
        assert result["same"] is True and result["own"] is False
        assert result["error"] == "E003"  # every rank raises, none is left waiting in a collective
        assert result["builds_shared"] is (rank == 0)  # one build for the job
        assert result["builds_own"] is True  # local rank 0 of each "node"
        assert result["probes_left"] == []
