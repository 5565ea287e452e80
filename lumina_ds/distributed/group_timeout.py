"""Every process group of a run waits as long as the run says (`--dist-timeout-minutes`), whoever creates it.

torch gives a group created without a timeout its backend's default (torch 2.13: 30 minutes for gloo, 10 for NCCL;
`distributed_c10d._get_default_timeout`), and DeepSpeed creates all of its groups so: `deepspeed.comm.new_group(ranks)`
passes none (data-, expert- and expert-data-parallel groups in deepspeed/utils/groups.py). torch has no public setting
for that default, but `_get_default_timeout` reads the module globals `default_pg_timeout` and
`default_pg_nccl_timeout` each time a group is made (new_group, split_group, new_subgroups, device meshes): setting
both for the length of a block gives the run's timeout to every group created inside it without one of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta


@contextmanager
def groups_wait(minutes: float) -> Iterator[None]:
    """Process groups created inside, by lumina-ds, DeepSpeed or torch, without a timeout get `minutes`."""
    from torch.distributed import distributed_c10d as c10d

    saved = c10d.default_pg_timeout, c10d.default_pg_nccl_timeout
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timedelta(minutes=minutes)
    try:
        yield
    finally:
        c10d.default_pg_timeout, c10d.default_pg_nccl_timeout = saved
