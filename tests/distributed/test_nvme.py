"""ZeRO-Infinity's DeepSpeed sections and swap directory (distributed/nvme.py): buffers derived from the model's
shapes as DeepSpeed asserts them, and one directory per run and rank, removed whatever happens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lumina_ds.config.presets import get_preset
from lumina_ds.config.run import DistributedConfig, RunConfig
from lumina_ds.distributed import nvme
from lumina_ds.distributed.ds_config import build_ds_config
from lumina_ds.distributed.nvme import (
    AIO_BLOCK_BYTES,
    ALIGN_BYTES,
    swap_dir,
    swap_shapes,
    swap_space,
)
from lumina_ds.errors import ConfigError
from lumina_ds.models.transformer import meta_transformer

MIB = 1 << 20


def nvme_run(preset: str = "debug", offload: str = "optimizer+params", **deepspeed: object) -> RunConfig:
    run = get_preset(preset)
    dist = run.distributed
    dist.zero_stage, dist.offload, dist.offload_device, dist.nvme_path = 3, offload, "nvme", "/nvme"
    dist.expert_parallel_size, dist.deepspeed = 1, {"zero_optimization": deepspeed} if deepspeed else {}
    run.validate()
    return run


def test_the_debug_preset_on_nvme_gets_buffers_for_its_shapes() -> None:
    """debug at fp32 on one process: the tied 2048 x 128 embedding (262,144 elements = 1 MiB) is the only parameter
    large enough to swap, and the largest; the optimizer's sub-group is the whole model (509,568 elements)."""
    zero = build_ds_config(nvme_run(), world_size=1, precision="fp32")["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "nvme", "nvme_path": "/nvme", "pin_memory": True, "buffer_count": 4}
    assert zero["offload_param"] == {"device": "nvme", "nvme_path": "/nvme", "pin_memory": True,
                                     "buffer_count": 1 + 2 * 1,  # the embedding held + twice one module's
                                     "buffer_size": 509_952,  # 509,568 rounded up to 1,024 elements
                                     "max_in_cpu": 0}  # fmt: skip


def test_the_aio_section_holds_what_the_buffers_are_derived_from() -> None:
    config = build_ds_config(nvme_run(offload="optimizer"), world_size=1, precision="fp32")
    assert config["aio"] == {"block_size": MIB, "intra_op_parallelism": 1, "queue_depth": 8, "single_submit": False,
                             "overlap_events": True}  # fmt: skip
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "nvme"
    assert "offload_param" not in config["zero_optimization"]  # --offload optimizer: parameters stay on the device


def test_a_deepspeed_json_tunes_the_queue_but_not_the_derived_keys() -> None:
    run = nvme_run()
    run.distributed.deepspeed = {"aio": {"queue_depth": 32, "single_submit": True}}
    aio = build_ds_config(run, world_size=1, precision="fp32")["aio"]
    assert aio["queue_depth"] == 32 and aio["single_submit"] is True and aio["block_size"] == MIB


def test_cpu_offload_is_unchanged() -> None:
    run = get_preset("debug")
    run.distributed.zero_stage, run.distributed.offload = 3, "optimizer+params"
    zero = build_ds_config(run, world_size=1, precision="fp32")["zero_optimization"]
    assert zero["offload_optimizer"] == zero["offload_param"] == {"device": "cpu", "pin_memory": True}


@pytest.mark.parametrize("sub_group_size", [None, 10**8])
def test_at_scale_a_buffer_holds_the_largest_partition_and_sub_group(sub_group_size: int | None) -> None:
    """b100 on 8 GPUs in bf16: what DeepSpeed asserts, computed independently from the module tree."""
    extra = {"sub_group_size": sub_group_size} if sub_group_size else {}
    run = nvme_run("b100", **extra)
    param = build_ds_config(run, world_size=8, precision="mixed_bf16")["zero_optimization"]["offload_param"]
    sizes = [-(-p.numel() // 8) for p in meta_transformer(run.model).parameters()]
    limit = sub_group_size or 10**9
    assert param["buffer_size"] >= max(sizes) and param["buffer_size"] % ALIGN_BYTES == 0
    assert param["buffer_size"] >= min(sum(sizes), limit - 1 + max(sizes))  # the largest sub-group fits
    assert param["buffer_size"] < limit + max(sizes) + ALIGN_BYTES  # and no more
    assert param["buffer_count"] >= 2 * 3  # an expert block gathers w1, w2, w3 at once, and the next one is read


class Chain(nn.Module):
    """Linear layers of 1 MiB fp32 weights, `per_block` of them in one module each, optionally one weight shared."""

    def __init__(self, blocks: int, per_block: int, shared: bool = False) -> None:
        super().__init__()
        side = 512  # 512 x 512 fp32 = 1 MiB: the smallest tensor DeepSpeed swaps
        self.blocks = nn.ModuleList(
            nn.ParameterList(nn.Parameter(torch.zeros(side, side)) for _ in range(per_block)) for _ in range(blocks)
        )
        if shared:
            self.head = nn.Module()
            self.head.weight = self.blocks[0][0]


def test_the_buffer_count_follows_the_reuse_window_and_the_largest_module() -> None:
    model = Chain(blocks=4, per_block=3)
    block = 3 * 512 * 512
    everything = swap_shapes(model, world_size=1, param_bytes=4, sub_group_size=10**9, reuse_distance=10**9)
    assert (everything.held, everything.fetched_together, everything.buffer_count) == (12, 3, 12 + 6)
    # the reuse window reaches back 2 x (elements after a module): the last block (0 after it) and the one before
    last_two = swap_shapes(model, world_size=1, param_bytes=4, sub_group_size=10**9, reuse_distance=2 * block + 1)
    assert last_two.held == 6
    none = swap_shapes(model, world_size=1, param_bytes=4, sub_group_size=10**9, reuse_distance=0)
    assert none.held == 0 and none.buffer_count == 6
    shared = swap_shapes(Chain(blocks=4, per_block=3, shared=True), world_size=1, param_bytes=4,
                         sub_group_size=10**9, reuse_distance=0)  # fmt: skip
    assert shared.held == 1  # a weight two modules use stays gathered between its uses


def test_partitions_below_one_mib_are_not_swapped() -> None:
    """On 2 ranks each 1 MiB weight is a 0.5 MiB partition: DeepSpeed keeps it in memory, it needs no buffer."""
    shapes = swap_shapes(Chain(blocks=2, per_block=3), world_size=2, param_bytes=4, sub_group_size=10**9,
                         reuse_distance=10**9)  # fmt: skip
    assert (shapes.held, shapes.fetched_together) == (0, 0) and shapes.buffer_count == 1
    assert shapes.largest_param == 512 * 512 // 2 and AIO_BLOCK_BYTES == MIB


@pytest.fixture
def no_op_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """The directory tests without DeepSpeed's AsyncIO op (its first build takes minutes; tests/integration builds
    and runs it)."""
    monkeypatch.setattr(nvme, "load_async_io", lambda where: None)


def nvme_config(root: Path, offload: str = "optimizer") -> DistributedConfig:
    return DistributedConfig(zero_stage=3, offload=offload, offload_device="nvme", nvme_path=str(root))


def test_each_run_swaps_in_its_own_directory_removed_at_the_end(tmp_path: Path, no_op_build: None) -> None:
    dist = nvme_config(tmp_path)
    assert swap_dir(dist) == str(tmp_path)  # outside a run: the path as given
    with swap_space(dist, experiment="exp", rank=0) as first:
        assert first is not None and first.parent.parent == tmp_path and first.name == "rank0"
        assert first.parent.name.startswith("exp-") and swap_dir(dist) == str(first)
        (first / "zero_stage_3").mkdir()
        (first / "zero_stage_3" / "x.tensor.swp").write_bytes(b"0" * 4096)
        with swap_space(dist, experiment="exp", rank=0) as second:  # another run beside it, same experiment name
            assert second is not None and second.parent != first.parent
        assert (first / "zero_stage_3" / "x.tensor.swp").exists()
    assert list(tmp_path.iterdir()) == [] and swap_dir(dist) == str(tmp_path)


def test_the_directory_is_removed_when_the_run_fails(tmp_path: Path, no_op_build: None) -> None:
    with (
        pytest.raises(RuntimeError, match="step failed"),
        swap_space(nvme_config(tmp_path), experiment="e", rank=0) as d,
    ):
        assert d is not None
        (d / "a.tensor.swp").write_bytes(b"1")
        raise RuntimeError("step failed")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_path_is_e003_and_cpu_offload_needs_no_directory(tmp_path: Path, no_op_build: None) -> None:
    with pytest.raises(ConfigError) as info, swap_space(nvme_config(tmp_path / "absent"), experiment="e", rank=0):
        pass
    assert info.value.code == "E003" and "is not a directory" in info.value.message
    with swap_space(DistributedConfig(zero_stage=3, offload="optimizer"), experiment="e", rank=0) as none:
        assert none is None


def test_parameters_on_nvme_need_two_processes_on_the_cpu(tmp_path: Path, no_op_build: None) -> None:
    """One CPU process: DeepSpeed's gather is the partition itself, in the swap buffer it reuses before backward."""
    with pytest.raises(ConfigError) as info, swap_space(nvme_config(tmp_path, "optimizer+params"), experiment="e",
                                                        rank=0):  # fmt: skip
        pass
    assert info.value.code == "E003" and "2 or more processes" in info.value.message
    assert "--offload optimizer" in info.value.hint and list(tmp_path.iterdir()) == []


def test_without_libaio_the_op_cannot_build_and_that_is_e003(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepspeed.ops.op_builder import AsyncIOBuilder

    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False)
    problem = nvme.load_async_io("host, rank 0")
    assert problem is not None and problem.code == "E003" and "libaio-dev" in problem.hint
