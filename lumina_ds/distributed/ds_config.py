"""DeepSpeed's JSON, derived from a RunConfig: the run config's decisions plus the DeepSpeed keys it does not model
(`distributed.deepspeed`: buckets, overlap, offload, ... from the preset's planned layout and --deepspeed-config)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lumina_ds.config.io import deep_merge
from lumina_ds.config.run import RunConfig
from lumina_ds.errors import ConfigError


def resolve_precision(requested: str, *, cuda: bool, bf16_supported: bool) -> str:
    """`auto`: bf16 mixed precision where the GPU has it, fp16 mixed on older GPUs, fp32 on CPU."""
    if requested != "auto":
        return requested
    if not cuda:
        return "fp32"
    return "mixed_bf16" if bf16_supported else "mixed_fp16"


def hardware_precision() -> tuple[bool, bool]:
    cuda = torch.cuda.is_available()
    # emulated bf16 (V100, T4: fp32 math behind a bf16 dtype) runs, but slowly and without bf16 tensor cores;
    # `auto` must then pick fp16 mixed precision, so only native support counts (compute capability >= 8.0)
    return cuda, bool(cuda and torch.cuda.is_bf16_supported(including_emulation=False))


def check_precision_supported(precision: str, *, cuda: bool, bf16_supported: bool) -> None:
    if precision in ("fp16", "mixed_fp16") and not cuda:
        raise ConfigError(
            "E003",
            f"precision {precision} needs a CUDA GPU (DeepSpeed refuses fp16 on the CPU)",
            "use --precision bf16 or fp32 on this machine",
        )
    if precision in ("bf16", "mixed_bf16") and cuda and not bf16_supported:
        raise ConfigError("E003", "this GPU has no bf16 support", "use --precision mixed_fp16 (V100/T4) or fp32")


def select_precision(requested: str) -> str:
    """The precision this machine will run `requested` at; E003 when it cannot."""
    cuda, bf16_ok = hardware_precision()
    precision = resolve_precision(requested, cuda=cuda, bf16_supported=bf16_ok)
    check_precision_supported(precision, cuda=cuda, bf16_supported=bf16_ok)
    return precision


def precision_sections(precision: str) -> dict[str, Any]:
    """`bf16`/`fp16`: 16-bit weights, gradients and optimizer math; `mixed_*`: fp32 master weights."""
    if precision == "fp32":
        return {}
    if precision in ("bf16", "mixed_bf16"):
        section: dict[str, Any] = {"enabled": True}
        if precision == "bf16":
            section.update(bf16_master_weights_and_grads=True, bf16_optimizer_states=True)
        return {"bf16": section}
    # dynamic loss scaling (loss_scale 0) for both fp16 modes; DeepSpeed keeps fp32 masters for fp16
    return {
        "fp16": {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    }


def fp32_grad_accumulation(precision: str, zero_stage: int, grad_accum: int) -> bool:
    """Whether DeepSpeed sums micro-batch gradients in fp32: mixed_bf16 with accumulation at ZeRO 1-3.

    DeepSpeed's default sums them in bf16, which drifts from the fp32 sum over many micro-batches (measured in
    benchmarks/NOTES.md; tests/training/test_grad_accum.py holds the order). ZeRO-0 refuses the mix. It costs memory
    (ZeRO-1 keeps a full fp32 gradient copy), which the planner counts.
    """
    return precision == "mixed_bf16" and zero_stage >= 1 and grad_accum > 1


def build_ds_config(run: RunConfig, *, world_size: int, precision: str) -> dict[str, Any]:
    """The run config's decisions in DeepSpeed's format, with the run's extra DeepSpeed keys merged in.

    The extras cannot override a decision: RunConfig.validate refuses the keys listed in OWNED_DEEPSPEED_KEYS.
    """
    train, dist = run.train, run.distributed
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": {"stage": dist.zero_stage},
        # our optimizer is a client torch AdamW built after expert replacement (see training/engine.py)
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "seed": train.seed,
    }
    config.update(precision_sections(precision))
    if fp32_grad_accumulation(precision, dist.zero_stage, train.grad_accum):
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if dist.offload != "none":  # stepped by DeepSpeed's CPU Adam (training/engine.py), never torch's on the host
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if dist.offload == "optimizer+params":
        config["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
    return deep_merge(config, dist.deepspeed)


def load_deepspeed_json(path: str) -> dict[str, Any]:
    """A user's DeepSpeed JSON file as a dict: E104 when missing, E002 when it is not a JSON object."""
    file = Path(path)
    if not file.exists():
        raise ConfigError("E104", f"--deepspeed-config {path} does not exist", "check the path")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError("E002", f"--deepspeed-config {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError("E002", f"--deepspeed-config {path} must hold a JSON object")
    return data
