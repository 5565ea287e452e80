"""`check-environment`: what this machine has for training (torch, CUDA, GPUs, DeepSpeed ops, MPI, memory, disk)
and whether it can run a preset at all."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lumina_ds.errors import ConfigError, LuminaError

GIB = 1024**3


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_report() -> dict[str, Any]:
    """torch and the CUDA stack it was built with (None where it was built without CUDA)."""
    cuda_build = torch.version.cuda is not None
    nccl = None
    if cuda_build and torch.distributed.is_nccl_available():
        nccl = ".".join(str(v) for v in torch.cuda.nccl.version())
    return {
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda_build else None,
        "nccl": nccl,
        "cuda_available": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
    }


def gpu_report() -> list[dict[str, Any]]:
    """Every visible GPU: name, memory, compute capability, bf16 (Ampere, sm_80, and newer)."""
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append(
            {
                "index": i,
                "name": props.name,
                "memory_gib": round(props.total_memory / GIB, 2),
                "compute_capability": f"{props.major}.{props.minor}",
                "bf16": props.major >= 8,
            }
        )
    return gpus


def precision_report() -> dict[str, Any]:
    """Which precisions DeepSpeed accepts here, and what `--precision auto` resolves to."""
    from lumina_ds.distributed.ds_config import hardware_precision, resolve_precision

    cuda, bf16_ok = hardware_precision()
    # on the CPU DeepSpeed trains in bf16 (AVX-512 BF16 makes it fast) but refuses fp16
    return {
        "bf16": bf16_ok if cuda else True,
        "fp16": cuda,
        "auto": resolve_precision("auto", cuda=cuda, bf16_supported=bf16_ok),
    }


def torch_extensions_dir() -> Path:
    """Where torch's JIT builds of DeepSpeed ops are cached (the layout of torch.utils.cpp_extension): the folder
    TORCH_EXTENSIONS_DIR names as it is, else a per-Python, per-accelerator folder under the user's cache."""
    from torch.utils.cpp_extension import get_default_build_root

    if (chosen := os.environ.get("TORCH_EXTENSIONS_DIR")) is not None:
        return Path(chosen)
    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    else:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{sys.abiflags}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


STALE_LOCK_S = 300  # a JIT build of one op takes a minute or two; a lock this old belongs to a killed build


def build_lock_age_s(op_dir: Path) -> float | None:
    """Age of torch's build lock for one op; while the file exists, every process that loads the op waits."""
    try:
        return time.time() - (op_dir / "lock").stat().st_mtime
    except FileNotFoundError:
        return None


def deepspeed_ops() -> list[dict[str, Any]]:
    """ds_report's op table without compiling anything: prebuilt at install, JIT-built and cached, compatible."""
    import contextlib
    import io

    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops
    from deepspeed.ops.op_builder.all_ops import ALL_OPS
    from deepspeed.ops.op_builder.builder import probe_is_compatible

    cache = torch_extensions_dir()
    same_accelerator = accelerator_name == get_accelerator()._name
    ops = []
    for name, builder in ALL_OPS.items():
        with contextlib.redirect_stdout(io.StringIO()):  # probes print warnings for ops that cannot build
            compatible = bool(probe_is_compatible(builder, False))
        ops.append(
            {
                "name": name,
                "prebuilt": bool(installed_ops.get(name, False)) and same_accelerator,
                "jit_cached": any((cache / name).glob("*.so")),
                "build_lock": str(cache / name / "lock"),
                "build_lock_age_s": build_lock_age_s(cache / name),
                "compatible": compatible,
            }
        )
    return ops


def deepspeed_report() -> dict[str, Any]:
    from lumina_ds.distributed.env import configure_accelerator

    configure_accelerator()  # before deepspeed is imported: it picks its accelerator once
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import is_ninja_available

    return {
        "version": deepspeed.__version__,
        "accelerator": get_accelerator()._name,
        "ninja": is_ninja_available(),
        "ops": deepspeed_ops(),
    }


def flash_attn_report() -> dict[str, Any]:
    """The installed version and whether it really imports (the real import is tried once, as training does)."""
    from lumina_ds.models.attention import flash_attn_status

    status = flash_attn_status()
    version = package_version("flash-attn") or package_version("flash_attn")
    return {"version": version, "importable": status.available, "detail": status.detail}


def launch_report() -> dict[str, Any]:
    """What this process's launcher says about its rank, resolved without starting a process group."""
    from lumina_ds.distributed.launchers import detect_launch

    try:
        return detect_launch(os.environ).as_dict()
    except LuminaError as exc:
        return {"error": {"code": exc.code, "message": exc.message, "hint": exc.hint}}


def command_first_line(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.splitlines()[0] if out else None


def mpi_report() -> dict[str, Any]:
    """mpi4py and the MPI launcher (mpi4py.MPI is not imported: that would initialise MPI in this process)."""
    return {
        "mpi4py": package_version("mpi4py"),
        "mpirun": command_first_line(["mpirun", "--version"]),
        "launchers": {name: shutil.which(name) is not None for name in ("ompi_info", "pdsh", "srun", "torchrun")},
    }


def existing_parent(path: Path) -> Path:
    """The directory whose file system `path` will be created on."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def host_report(output_dir: str) -> dict[str, Any]:
    import psutil

    mem = psutil.virtual_memory()
    disk = shutil.disk_usage(existing_parent(Path(output_dir)))
    return {
        "cpus": os.cpu_count(),
        "ram_total_gib": round(mem.total / GIB, 2),
        "ram_available_gib": round(mem.available / GIB, 2),
        "output_dir": output_dir,
        "disk_free_gib": round(disk.free / GIB, 2),
    }


def environment_report(output_dir: str) -> dict[str, Any]:
    """Everything `check-environment` shows, as plain data (the `--json` output)."""
    return {
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "torch": torch_report(),
        "gpus": gpu_report(),
        "precision": precision_report(),
        "deepspeed": deepspeed_report(),
        "flash_attn": flash_attn_report(),
        "mpi": mpi_report(),
        "launch": launch_report(),
        "host": host_report(output_dir),
    }


@dataclass(frozen=True)
class PresetCheck:
    """Whether this machine can hold a preset's model states at all: ZeRO-3 over its GPUs, spilling to host RAM."""

    preset: str
    precision: str
    parameters: int
    ranks: int
    model_states_gib: float
    capacity_gib: float

    @property
    def fits(self) -> bool:
        return self.model_states_gib <= self.capacity_gib

    def as_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "precision": self.precision,
            "parameters": self.parameters,
            "ranks": self.ranks,
            "model_states_bytes": round(self.model_states_gib * GIB),
            "model_states_gib": round(self.model_states_gib, 3),
            "capacity_gib": round(self.capacity_gib, 3),
            "fits": self.fits,
        }


def model_states_bytes(run: Any, *, precision: str, ranks: int) -> tuple[int, float]:
    """(parameters, bytes of parameters + gradients + optimizer states on all ranks of this machine) at ZeRO-3:
    the least any layout holds (ZeRO-3 shards every state; activations and buffers come on top)."""
    from lumina_ds.planning.memory import model_state_bytes
    from lumina_ds.planning.memory_inputs import Layout, ParamInventory

    inventory = ParamInventory.of(run.model)
    memory_precision = "mixed_bf16" if precision == "auto" else precision
    layout = Layout(zero_stage=3, gpus=ranks, gpus_per_node=ranks, precision=memory_precision)
    per_rank = model_state_bytes(inventory, layout)
    return inventory.total, sum(per_rank.values()) * ranks


def check_preset(preset: str, *, precision: str | None, report: dict[str, Any]) -> PresetCheck:
    """E003 when this machine cannot run `preset`: a precision it lacks, or model states beyond GPU + host memory."""
    from lumina_ds.config.presets import get_preset
    from lumina_ds.distributed.ds_config import select_precision

    run = get_preset(preset)
    chosen = select_precision(precision or run.train.precision)
    gpus = report["gpus"]
    ranks = max(1, len(gpus))
    parameters, need = model_states_bytes(run, precision=chosen, ranks=ranks)
    capacity = sum(g["memory_gib"] for g in gpus) + report["host"]["ram_available_gib"]
    check = PresetCheck(preset, chosen, parameters, ranks, need / GIB, capacity)
    if not check.fits:
        where = f"{len(gpus)} GPU(s) and available host RAM" if gpus else "available host RAM, no GPU"
        raise ConfigError(
            "E003",
            f"preset {preset} ({parameters / 1e9:.2f}B parameters, {chosen}) needs {check.model_states_gib:.1f} GiB "
            f"of model states even at ZeRO-3; this machine has {capacity:.1f} GiB ({where})",
            f"run it on a cluster (`lumina-ds plan --preset {preset} --nodes N --gpus-per-node 8` sizes one) "
            "or pick a smaller preset",
        )
    return check


def check_environment(
    *, output_dir: str, preset: str | None, precision: str | None
) -> tuple[dict[str, Any], LuminaError | None]:
    """The report with the precision a run would use and, for a preset, `check`; the error when it cannot run here.

    The error is also in the report (`error`: code, message, hint) so that `--json` carries it.
    """
    from lumina_ds.distributed.ds_config import select_precision

    report = environment_report(output_dir)
    try:
        if preset is not None:
            report["check"] = check_preset(preset, precision=precision, report=report).as_dict()
        else:
            report["check"] = {"precision": select_precision(precision or "auto")}
    except LuminaError as exc:
        report["error"] = {"code": exc.code, "message": exc.message, "hint": exc.hint}
        return report, exc
    return report, None


def yes_no(value: object) -> str:
    return "yes" if value else "no"


def format_software(report: dict[str, Any]) -> list[str]:
    t, ds, fa, mpi = report["torch"], report["deepspeed"], report["flash_attn"], report["mpi"]
    cuda = f"CUDA {t['cuda']} | cuDNN {t['cudnn']} | NCCL {t['nccl']}" if t["cuda"] else "CPU build (no CUDA)"
    launchers = ", ".join(f"{k} {yes_no(v)}" for k, v in mpi["launchers"].items())
    lines = [
        f"python      {report['python']['version']} ({report['python']['executable']})",
        f"torch       {t['version']} | {cuda} | {t['threads']} threads",
        f"deepspeed   {ds['version']} | accelerator {ds['accelerator']} | ninja {yes_no(ds['ninja'])} (JIT builds)",
        f"  {'op':<28}{'prebuilt':<10}{'jit-cached':<12}compatible",
    ]
    for op in ds["ops"]:
        built = f"{yes_no(op['prebuilt']):<10}{yes_no(op['jit_cached']):<12}"
        lines.append(f"  {op['name']:<28}{built}{yes_no(op['compatible'])}")
    for op in ds["ops"]:
        age = op["build_lock_age_s"]
        if age is not None and age > STALE_LOCK_S:
            lines.append(
                f"  warning: {op['build_lock']} is {age / 60:.0f} min old: a killed build left it, and every run that"
                f" loads {op['name']} waits for it forever. Remove it: rm {op['build_lock']}"
            )
    flash = f"{fa['version']} (imports: {yes_no(fa['importable'])})" if fa["version"] else "not installed"
    if fa["version"] and not fa["importable"]:
        flash += f": {fa['detail']}"
    lines.append(f"flash-attn  {flash}")
    lines.append(f"mpi         mpi4py {mpi['mpi4py'] or 'not installed'} | {mpi['mpirun'] or 'no mpirun'}")
    lines.append(f"launchers   {launchers}")
    lines.append(f"launch      {format_launch(report['launch'])}")
    return lines


def format_launch(launch: dict[str, Any]) -> str:
    if "error" in launch:
        return f"[{launch['error']['code']}] {launch['error']['message']}"
    unset = "(a free port)" if launch["launcher"] == "none" else "(from rank 0)"
    master = f"{launch['master_addr'] or '(from rank 0)'}:{launch['master_port'] or unset}"
    return (
        f"{launch['launcher']} | rank {launch['rank']} of {launch['world_size']} | local rank "
        f"{launch['local_rank']} of {launch['local_world_size']} | rendezvous {master}"
    )


def format_hardware(report: dict[str, Any]) -> list[str]:
    gpus, p, h = report["gpus"], report["precision"], report["host"]
    lines = [f"gpus        {len(gpus) or 'none: CPU training (DeepSpeed CPU accelerator, gloo)'}"]
    for g in gpus:
        lines.append(
            f"  {g['index']:<3}{g['name']:<28}{g['memory_gib']:>8.1f} GiB  sm {g['compute_capability']}"
            f"  bf16 {yes_no(g['bf16'])}"
        )
    fp16 = "yes" if p["fp16"] else "no (needs a GPU)"
    lines.append(f"precision   bf16 {yes_no(p['bf16'])} | fp16 {fp16} | auto -> {p['auto']}")
    lines.append(
        f"host        {h['cpus']} CPUs | RAM {h['ram_available_gib']:.1f} of {h['ram_total_gib']:.1f} GiB available"
        f" | disk {h['disk_free_gib']:.1f} GiB free for {h['output_dir']}"
    )
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The human-readable report (the error, if any, is printed by the caller)."""
    lines = format_software(report) + format_hardware(report)
    check = report.get("check")
    if check and "preset" in check:
        lines.append(
            f"preset      {check['preset']}: {check['parameters']:,} parameters at {check['precision']}, "
            f"model states {check['model_states_gib']:.2f} GiB at ZeRO-3 over {check['ranks']} rank(s), "
            f"{check['capacity_gib']:.1f} GiB GPU + host memory: fits"
        )
    elif check:
        lines.append(f"run         precision {check['precision']}")
    return "\n".join(lines)
