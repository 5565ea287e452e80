"""The one table of GPUs: datasheet peaks for the step-time model, MFU and time estimates, and the memory torch
reports, matched by `--gpu` name or by `torch.cuda.get_device_name()`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lumina_ds.errors import ConfigError


@dataclass(frozen=True)
class GpuSpec:
    key: str  # what --gpu / --hardware-profile takes
    pattern: str  # regex on torch.cuda.get_device_name(); the table is searched most specific first
    bf16: float | None  # dense tensor-core peak FLOP/s (no sparsity); None: no bf16 tensor cores
    fp16: float
    fp32: float
    memory_gib: float  # total memory as torch reports it (below the datasheet's GB: the driver reserves some)


# Datasheets (NVIDIA H100, H200, B200, A100, L40S, A10, V100; AWS G5 for the A10G), dense peaks. Memory: H200 read
# here (139.8 GiB), H100 80 GB as reported by a user (79.1 GiB); the others are nvidia-smi's total less the same
# reserve, so approximate: pass --gpu-mem-gb with what `lumina-ds check-environment` shows on your GPUs.
GPUS: tuple[GpuSpec, ...] = (
    GpuSpec("h100-nvl", r"H100 NVL", 835e12, 835e12, 60e12, 93.1),
    GpuSpec("h100-pcie", r"H100 PCIe", 756e12, 756e12, 51e12, 79.1),
    GpuSpec("h100", r"H100", 989e12, 989e12, 67e12, 79.1),  # SXM
    GpuSpec("h200", r"H200", 989e12, 989e12, 67e12, 139.8),
    GpuSpec("b200", r"B200", 2250e12, 2250e12, 80e12, 178.4),
    GpuSpec("a100", r"A100", 312e12, 312e12, 19.5e12, 79.2),  # 80 GB; the 40 GB part reports about 39.4
    GpuSpec("l40s", r"L40S", 362e12, 362e12, 91.6e12, 44.4),
    GpuSpec("a10g", r"A10G", 70e12, 70e12, 35e12, 22.0),
    GpuSpec("a10", r"\bA10\b", 125e12, 125e12, 31.2e12, 22.0),
    GpuSpec("v100", r"V100", None, 125e12, 15.7e12, 31.7),
)
GPU_KEYS = tuple(spec.key for spec in GPUS)


def gpu_spec(name: str) -> GpuSpec:
    """By --gpu name; LuminaAI's hardware profiles (`a100-80gb`) drop their suffixes until a name matches."""
    parts = name.lower().split("-")
    for end in range(len(parts), 0, -1):
        key = "-".join(parts[:end])
        for spec in GPUS:
            if spec.key == key:
                return spec
    raise ConfigError("E002", f"unknown GPU {name!r}", f"choose one of {', '.join(GPU_KEYS)}")


def gpu_spec_of_device(device_name: str) -> GpuSpec | None:
    """The spec whose pattern matches a CUDA device name (most specific first), or None."""
    return next((spec for spec in GPUS if re.search(spec.pattern, device_name)), None)


def dense_peak_tflops(device_name: str) -> float | None:
    """MFU's denominator: the dense bf16 peak (fp16 without bf16) of a CUDA device name in TFLOP/s; None if unknown."""
    spec = gpu_spec_of_device(device_name)
    if spec is None:
        return None
    return (spec.bf16 if spec.bf16 is not None else spec.fp16) / 1e12


def matmul_dtype(precision: str) -> str:
    if precision == "fp32":
        return "fp32"
    return "fp16" if precision in ("fp16", "mixed_fp16") else "bf16"


def peak_flops(gpu: str, precision: str) -> float:
    """Datasheet dense peak of `gpu` for the matmul dtype of `precision` (auto plans bf16)."""
    spec = gpu_spec(gpu)
    peak = getattr(spec, matmul_dtype(precision))
    if peak is None:
        raise ConfigError("E002", f"{gpu} has no bf16 tensor cores", "use --precision mixed_fp16 on this GPU")
    return float(peak)
