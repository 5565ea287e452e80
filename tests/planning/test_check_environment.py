"""`lumina-ds check-environment`: the report, the precision `auto` picks, and E003 for what this machine cannot run."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from lumina_ds.cli import main
from lumina_ds.config.presets import get_preset
from lumina_ds.distributed import ds_config
from lumina_ds.models.counting import count_parameters
from lumina_ds.models.transformer import Transformer
from lumina_ds.planning import environment

GIB = 1024**3
SECTIONS = {"launch", "python", "torch", "gpus", "precision", "deepspeed", "flash_attn", "mpi", "host", "check"}


def check_env(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["check-environment", *args])
    out, err = capsys.readouterr()
    return code, out, err


def as_json(args: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> tuple[int, dict[str, Any], str]:
    code, out, err = check_env([*args, "--json", "--output-dir", str(tmp_path / "runs")], capsys)
    return code, json.loads(out), err


def test_json_report_describes_this_machine(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, report, _ = as_json([], capsys, tmp_path)
    assert code == 0 and set(report) == SECTIONS
    assert report["torch"]["version"] == torch.__version__
    assert report["torch"]["cuda_available"] == torch.cuda.is_available()
    assert len(report["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert report["deepspeed"]["version"] == importlib.metadata.version("deepspeed")
    ops = {op["name"]: op for op in report["deepspeed"]["ops"]}
    # ops every accelerator's builder set has; no key is missing or mistyped
    assert {"cpu_adam", "fused_adam"} <= set(ops)
    assert all(isinstance(op[k], bool) for op in ops.values() for k in ("prebuilt", "jit_cached", "compatible"))
    assert report["mpi"]["mpi4py"] == importlib.metadata.version("mpi4py")
    assert report["mpi"]["launchers"]["ompi_info"] == (shutil.which("ompi_info") is not None)
    host = report["host"]
    # the output dir does not exist yet: the free space is that of the file system it will be created on
    assert math.isclose(host["disk_free_gib"], shutil.disk_usage(tmp_path).free / GIB, abs_tol=0.5)
    assert math.isclose(host["ram_total_gib"], psutil.virtual_memory().total / GIB, abs_tol=0.01)
    assert report["check"] == {"precision": report["precision"]["auto"]}


def test_precision_auto_follows_the_hardware(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _, report, _ = as_json([], capsys, tmp_path)
    if not torch.cuda.is_available():
        # CPU: DeepSpeed takes bf16 but refuses fp16; auto trains in fp32 (bf16 gains nothing for small models)
        assert report["precision"] == {"bf16": True, "fp16": False, "auto": "fp32"}
    else:
        bf16 = torch.cuda.is_bf16_supported()
        assert report["precision"] == {"bf16": bf16, "fp16": True, "auto": "mixed_bf16" if bf16 else "mixed_fp16"}


def test_debug_preset_fits_with_its_model_states_counted(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, report, _ = as_json(["--preset", "debug", "--precision", "fp32"], capsys, tmp_path)
    check = report["check"]
    model = Transformer(get_preset("debug").model)
    n = count_parameters(get_preset("debug").model).total
    assert code == 0 and check["fits"] and check["parameters"] == n == sum(p.numel() for p in model.parameters())
    ranks = check["ranks"]
    # fp32 at ZeRO-3, per parameter over all ranks: 4 param + 4 grad + 4 fp32 master + 8 Adam m, v + 4 for the
    # gradient's fp32 copy (one sub-group, which holds the whole shard of a model this small); parameters under
    # ZeRO-3's persistence threshold (1e5 elements) also stay whole on every rank (4 bytes each)
    small = sum(p.numel() for p in model.parameters() if p.numel() <= 100_000)
    assert math.isclose(check["model_states_bytes"], 24 * n + 4 * small * ranks, rel_tol=1e-6)


def test_debug_text_report(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = check_env(["--preset", "debug"], capsys)
    auto = ds_config.select_precision("auto")
    assert code == 0 and err == ""
    for line in ("python ", "torch ", "deepspeed ", "cpu_adam", "flash-attn ", "mpi ", "gpus ", "host "):
        assert line in out
    assert f"auto -> {auto}" in out
    n = count_parameters(get_preset("debug").model).total
    assert f"preset      debug: {n:,} parameters at {auto}" in out and out.rstrip().endswith("fits")


def test_preset_too_big_for_this_machine_is_e003(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, report, err = as_json(["--preset", "b300"], capsys, tmp_path)
    assert code == 1 and report["error"]["code"] == "E003" and "[E003] preset b300" in err
    assert "lumina-ds plan --preset b300" in report["error"]["hint"]
    assert "check" not in report  # the report itself is complete
    # 295B parameters need terabytes of model states: more than any single machine's GPUs and RAM
    assert "needs" in report["error"]["message"]


def test_fp16_without_a_gpu_is_e003(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ds_config, "hardware_precision", lambda: (False, False))
    code, report, err = as_json(["--precision", "mixed_fp16"], capsys, tmp_path)
    assert code == 1 and report["error"]["code"] == "E003" and "needs a CUDA GPU" in err


def gpu_machine(monkeypatch: pytest.MonkeyPatch, *, gpus: int, gib: float, ram_gib: float) -> dict[str, Any]:
    """A report as an 8-GPU node would produce it (bf16 GPUs), without touching CUDA."""
    monkeypatch.setattr(ds_config, "hardware_precision", lambda: (True, True))
    gpu = {"name": "H100", "memory_gib": gib, "compute_capability": "9.0", "bf16": True}
    return {"gpus": [{"index": i, **gpu} for i in range(gpus)], "host": {"ram_available_gib": ram_gib}}


def test_gpu_node_capacity_counts_gpus_and_host_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    report = gpu_machine(monkeypatch, gpus=8, gib=80.0, ram_gib=500.0)
    b1 = environment.check_preset("b1", precision=None, report=report)
    assert (b1.precision, b1.ranks, b1.capacity_gib, b1.fits) == ("mixed_bf16", 8, 1140.0, True)
    with pytest.raises(environment.ConfigError) as err:
        environment.check_preset("b100", precision=None, report=report)
    # 97.8B parameters x 16 bytes (2 param + 2 grad + 4 master + 8 Adam) = 1457 GiB, before the fp32 gradient
    # sub-groups: more than 8 x 80 GiB + 500 GiB
    assert err.value.code == "E003" and "8 GPU(s) and available host RAM" in err.value.message
    assert "needs 14" in err.value.message  # 1457 GiB + 8 x 1e9 x 4 bytes of sub-groups = 1487 GiB


def test_a_stale_build_lock_is_named_with_the_command_that_removes_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch waits forever on an op's build lock that a killed build left behind: the report says which and how."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    fresh, stale = environment.torch_extensions_dir() / "fused_adam", environment.torch_extensions_dir() / "cpu_adam"
    for op_dir in (fresh, stale):
        op_dir.mkdir(parents=True)
        (op_dir / "lock").touch()
    old = time.time() - environment.STALE_LOCK_S - 60  # older than any build takes; the fresh one may be building
    os.utime(stale / "lock", (old, old))
    _, out, _ = check_env([], capsys)
    warnings = [line for line in out.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and f"rm {stale / 'lock'}" in warnings[0] and "cpu_adam" in warnings[0]
    _, report, _ = as_json([], capsys, tmp_path)
    ages = {op["name"]: op["build_lock_age_s"] for op in report["deepspeed"]["ops"]}
    assert ages["cpu_adam"] > environment.STALE_LOCK_S and 0 <= ages["fused_adam"] < environment.STALE_LOCK_S
    assert all(age is None for name, age in ages.items() if name not in ("cpu_adam", "fused_adam"))


@pytest.mark.parametrize("chosen", [True, False])
def test_extensions_dir_is_where_torch_builds(chosen: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TORCH_EXTENSIONS_DIR is used as it is; without it torch adds a py<ver>_<accelerator> folder to its cache."""
    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    if chosen:
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    else:
        monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    torch_dir = Path(_get_build_directory("some_op", verbose=False))  # torch's own answer (it creates the folder)
    assert environment.torch_extensions_dir() / "some_op" == torch_dir
    assert torch_dir.is_relative_to(tmp_path / ("ext" if chosen else "cache"))


class _V100:
    name, total_memory, major, minor = "Tesla V100-SXM2-32GB", 32 * 2**30, 7, 0


def test_emulated_bf16_counts_as_no_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch reports bf16 on a V100 when emulation counts: `auto` must pick fp16 there, and the GPU row must agree."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: _V100())
    assert ds_config.select_precision("auto") == "mixed_fp16"
    (gpu,) = environment.gpu_report()
    precision = environment.precision_report()
    assert gpu["bf16"] is False and precision["bf16"] is False and precision["auto"] == "mixed_fp16"
    with pytest.raises(environment.ConfigError) as err:
        ds_config.select_precision("mixed_bf16")
    assert err.value.code == "E003"


def test_launch_section_shows_what_this_rank_resolves_to(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a user runs when a launch misbehaves: here an srun task of a pmi2 job, rank 9 of 16 on node 2."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    task = {"PMI_RANK": "9", "PMI_SIZE": "16", "SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "16",
            "SLURM_STEP_NUM_NODES": "2", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
            "MASTER_ADDR": "gpu-01", "SLURM_JOB_ID": "7"}  # fmt: skip
    for name, value in task.items():
        monkeypatch.setenv(name, value)
    _, report, _ = as_json([], capsys, tmp_path)
    assert report["launch"] == {"launcher": "slurm", "rank": 9, "world_size": 16, "local_rank": 1,
                                "local_world_size": 8, "master_addr": "gpu-01", "master_port": "20007"}  # fmt: skip
    assert "RANK" not in os.environ  # resolved without touching the environment or starting a process group
    monkeypatch.delenv("SLURM_LOCALID")
    code, out, _ = check_env(["--output-dir", str(tmp_path / "runs")], capsys)
    assert code == 0 and "launch      [E003] the launcher gave rank 9 of 16" in out
