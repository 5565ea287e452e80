"""--offload-device and --nvme-path: NVMe offload (ZeRO-Infinity) is a run-config decision, checked from the config
alone (E002 with a hint): it needs something to offload, a path, ZeRO-3, and no AutoEP expert parallelism (DeepSpeed
cannot checkpoint that with the optimizer on NVMe); a path with the cpu device would be parsed and ignored."""

from __future__ import annotations

import pytest

from lumina_ds.cli import build_parser
from lumina_ds.config.run import DistributedConfig
from tests.config.test_validation import raises_config_error
from tests.runs import TRAIN

NVME = {"offload_device": "nvme", "nvme_path": "/nvme", "offload": "optimizer+params", "zero_stage": 3}


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"nvme_path": None}, ("needs --nvme-path", "local NVMe drive")),
        ({"offload": "none"}, ("needs something to offload", "--offload optimizer+params")),
        ({"offload": "optimizer", "zero_stage": 2}, ("NVMe offload needs ZeRO stage 3", "--zero-stage 3")),
        ({"offload_device": "cpu"}, ("--nvme-path /nvme is given but the offload device is cpu", "--offload-device")),
        ({"offload_device": "disk"}, ("offload_device='disk'", "cpu, nvme")),
        ({"expert_parallel_size": 2}, ("cannot checkpoint AutoEP", "--expert-parallel-size 1")),
    ],
)
def test_nvme_offload_mistakes_are_e002_with_a_hint(changes: dict[str, object], fragments: tuple[str, ...]) -> None:
    config = DistributedConfig(**{**NVME, **changes})  # type: ignore[arg-type]
    raises_config_error(config.validate, "E002", *fragments)


@pytest.mark.parametrize("offload", ["optimizer", "optimizer+params"])
def test_nvme_offload_at_zero_3_is_valid(offload: str) -> None:
    DistributedConfig(**{**NVME, "offload": offload}).validate()  # type: ignore[arg-type]
    DistributedConfig(**{**NVME, "moe_backend": "autoep", "expert_parallel_size": 1}).validate()  # type: ignore[arg-type]


def test_the_derived_aio_keys_are_owned_and_the_others_are_free_to_tune() -> None:
    owned = DistributedConfig(**NVME, deepspeed={"aio": {"block_size": 4096}})  # type: ignore[arg-type]
    raises_config_error(owned.validate, "E002", "aio.block_size", "--offload-device nvme")
    threads = DistributedConfig(**NVME, deepspeed={"aio": {"intra_op_parallelism": 4}})  # type: ignore[arg-type]
    raises_config_error(threads.validate, "E002", "aio.intra_op_parallelism")
    path = DistributedConfig(**NVME, deepspeed={"zero_optimization": {"offload_param": {"nvme_path": "/x"}}})  # type: ignore[arg-type]
    raises_config_error(path.validate, "E002", "--nvme-path")
    DistributedConfig(**NVME, deepspeed={"aio": {"queue_depth": 32, "single_submit": True}}).validate()  # type: ignore[arg-type]


def test_the_flags_set_the_fields_and_resolve() -> None:
    from lumina_ds.cli.train import resolve_run

    base = ["train", "--preset", "debug", "--train-data", TRAIN]
    argv = [*base, "--zero-stage", "3", "--offload", "optimizer+params", "--offload-device", "nvme", "--nvme-path",
            "/mnt/nvme0"]  # fmt: skip
    run = resolve_run(build_parser().parse_args(argv), world_size=1, announce=False)
    assert (run.distributed.offload_device, run.distributed.nvme_path) == ("nvme", "/mnt/nvme0")
    default = resolve_run(build_parser().parse_args(base), world_size=1, announce=False)
    assert (default.distributed.offload_device, default.distributed.nvme_path) == ("cpu", None)
