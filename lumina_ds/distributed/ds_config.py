"""DeepSpeed's JSON, derived from a RunConfig: the run config's decisions plus the DeepSpeed keys it does not model
(`distributed.deepspeed`: buckets, overlap, offload, ... from the preset's planned layout and --deepspeed-config)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lumina_ds.config.io import deep_merge
from lumina_ds.config.run import RunConfig
from lumina_ds.distributed.nvme import nvme_sections, swap_dir
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
        config = deep_merge(config, offload_sections(run, world_size=world_size, precision=precision))
    return deep_merge(config, dist.deepspeed)


def offload_sections(run: RunConfig, *, world_size: int, precision: str) -> dict[str, Any]:
    """ZeRO-Offload to host memory, or ZeRO-Infinity to NVMe swap files in this run's swap directory (its buffers
    derived from the model by distributed/nvme.py)."""
    dist = run.distributed
    if dist.offload_device == "nvme":
        return nvme_sections(run, world_size=world_size, precision=precision, nvme_path=swap_dir(dist))
    zero = {"offload_optimizer": {"device": "cpu", "pin_memory": True}}
    if dist.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {"zero_optimization": zero}


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


# --precision auto becomes one of these on each machine (resolve_precision), so a file made on another machine may
# hold another one's sections; the keys they write
AUTO_PRECISIONS = ("mixed_bf16", "mixed_fp16", "fp32")
PRECISION_KEYS = ("bf16", "fp16", "amp", "torch_autocast", "data_types")


MACHINE_CHOICES = frozenset({"async_split_plan"})  # what the machine decides (CUDA or not), not the run


def agrees(theirs: Any, mine: Any) -> bool:
    """A file's value of an owned key against the run's: equal, `"auto"` (as Hugging Face's DeepSpeed files say
    "whatever the run decides"), or a disabled section where the run writes none; keys the machine decides aside."""
    if theirs == "auto":
        return True
    if isinstance(theirs, dict) and isinstance(mine, dict):
        keys = theirs.keys() - MACHINE_CHOICES
        return keys == mine.keys() - MACHINE_CHOICES and all(agrees(theirs[key], mine[key]) for key in keys)
    if mine is None and isinstance(theirs, dict):
        return theirs.get("enabled") is False
    return bool(theirs == mine)


def owned_values(run: RunConfig, *, world_size: int, precision: str, expert_parallel: bool) -> dict[str, Any]:
    """What this run gives DeepSpeed for every owned key (None: left out); the AutoEP section only when asked, as
    it needs the model's module tree (built on the meta device)."""
    from lumina_ds.config.run import OWNED_DEEPSPEED_KEYS, owned_value

    config = build_ds_config(run, world_size=world_size, precision=precision)
    if expert_parallel:
        from lumina_ds.distributed.expert_parallel import autoep_section
        from lumina_ds.distributed.parallelize import uses_autoep
        from lumina_ds.models.transformer import meta_transformer

        if uses_autoep(run):  # as parallelize() adds it at initialize
            ep = run.distributed.expert_parallel_size
            config["expert_parallel"] = autoep_section(meta_transformer(run.model), ep_size=ep,
                                                       cuda=torch.cuda.is_available())  # fmt: skip
    return {key: owned_value(config, key) for key in OWNED_DEEPSPEED_KEYS}


@dataclass(frozen=True)
class FileCheck:
    """A --deepspeed-config file against the run as resolved on `world_size` processes of this machine."""

    user: dict[str, Any]
    run: RunConfig
    world_size: int
    precision: str  # what --precision resolves to here
    source: str


def check_deepspeed_file(run: RunConfig, *, world_size: int) -> list[str]:
    """The run-owned keys of --deepspeed-config (ds_configs/<preset>.json has them all) against the resolved run.

    A value equal to the run's passes. One that differs only because the file was made for another cluster passes
    with a note (returned for the console): train_batch_size beside the file's own micro-batch and accumulation, an
    AutoEP size that does not divide these processes, the sections another machine's --precision auto writes. Any
    other difference is E002 naming the flag and both values. The file's other keys were merged at resolution.
    """
    from lumina_ds.config.run import owned_keys_in, owned_value

    if not run.distributed.deepspeed_config:
        return []
    user = load_deepspeed_json(run.distributed.deepspeed_config)
    owned = owned_keys_in(user)
    if not owned:
        return []
    check = FileCheck(user, run, world_size, select_precision(run.train.precision),
                      f"--deepspeed-config {run.distributed.deepspeed_config}")  # fmt: skip
    with_ep = "expert_parallel" in owned
    mine = owned_values(run, world_size=world_size, precision=check.precision, expert_parallel=with_ep)
    differ = [key for key in owned if not agrees(owned_value(user, key), mine[key])]
    notes = []
    for keys, explain in EXPLAINED_BY_THE_MACHINE:
        if set(keys) & set(differ) and (note := explain(check)):
            notes.append(note)
            differ = [key for key in differ if key not in keys]
    if differ:
        raise owned_key_conflict(check, differ, mine)
    return notes


def _processes(train_batch_size: Any, rows_per_process: int) -> int | None:
    """How many processes a train_batch_size is made for at this micro-batch x accumulation (None: no whole number)."""
    if isinstance(train_batch_size, bool) or not isinstance(train_batch_size, int) or train_batch_size < 1:
        return None
    return train_batch_size // rows_per_process if train_batch_size % rows_per_process == 0 else None


def other_world_batch(check: FileCheck) -> str | None:
    """A whole DeepSpeed config (micro-batch and accumulation beside train_batch_size) made for another world size:
    lumina-ds derives train_batch_size for the processes there are, as it does for a planned layout."""
    user, train = check.user, check.run.train
    rows = train.micro_batch_size * train.grad_accum
    processes = _processes(user["train_batch_size"], rows)
    if processes is None or not {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps"} <= user.keys():
        return None
    return (
        f"{check.source} was made for {processes} processes: train_batch_size {user['train_batch_size']} there, "
        f"{rows * check.world_size} on the {check.world_size} here (micro-batch x accumulation x processes)"
    )


def other_world_expert_parallel(check: FileCheck) -> str | None:
    """An AutoEP section whose size does not divide these processes: the run's expert-parallel size shrank to one
    that does (planning/layouts.py), so the file was made for a larger world."""
    from lumina_ds.distributed.expert_parallel import autoep_section
    from lumina_ds.models.transformer import meta_transformer

    run, theirs = check.run, check.user["expert_parallel"]
    ep = run.distributed.expert_parallel_size
    size = theirs.get("autoep_size") if isinstance(theirs, dict) else None
    if not (isinstance(size, int) and size > ep and check.world_size % size != 0):
        return None
    if not (run.model.moe.enabled and run.distributed.moe_backend == "autoep"):
        return None
    if not agrees(theirs, autoep_section(meta_transformer(run.model), ep_size=size, cuda=torch.cuda.is_available())):
        return None
    return (
        f"{check.source} was made for more processes: its AutoEP size {size} does not divide the "
        f"{check.world_size} here, so this run's expert-parallel size is {ep}"
    )


def other_machine_precision(check: FileCheck) -> str | None:
    """Precision sections that --precision auto writes on another machine (a bf16 GPU, an fp16 GPU, a CPU)."""
    if check.run.train.precision != "auto":
        return None
    named = [key for key in PRECISION_KEYS if key in check.user]
    for other in AUTO_PRECISIONS:
        config = build_ds_config(check.run, world_size=check.world_size, precision=other)
        if other != check.precision and all(agrees(check.user[key], config.get(key)) for key in named):
            return (
                f"{check.source} was made for a machine where --precision auto is {other}; here it is "
                f"{check.precision} (--precision {other} would match the file)"
            )
    return None


# the owned keys whose value follows from the cluster a file was made for, and what explains a difference in them
EXPLAINED_BY_THE_MACHINE = (
    (("train_batch_size",), other_world_batch),
    (("expert_parallel",), other_world_expert_parallel),
    (PRECISION_KEYS, other_machine_precision),
)


def _show(value: Any) -> str:
    text = "not set" if value is None else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def owned_key_conflict(check: FileCheck, differ: list[str], mine: dict[str, Any]) -> ConfigError:
    """E002: each differing key with the file's value and the run's, and the flag that sets it."""
    from lumina_ds.config.run import owned_key_flags, owned_value

    values = ", ".join(f"{key} {_show(owned_value(check.user, key))} (this run: {_show(mine[key])})" for key in differ)
    return ConfigError(
        "E002",
        f"{check.source} sets {values}, which lumina-ds decides from its own flags",
        f"{owned_key_flags(differ)}.{_world_hint(check, differ)} A DeepSpeed JSON may repeat what lumina-ds decides "
        "(ds_configs/<preset>.json do) but not change it; drop the key or give the flag",
    )


def _world_hint(check: FileCheck, differ: list[str]) -> str:
    """Why a train_batch_size differs when it is this run's global batch on another number of processes."""
    train = check.run.train
    processes = _processes(check.user.get("train_batch_size"), train.micro_batch_size * train.grad_accum)
    if "train_batch_size" not in differ or processes is None:
        return ""
    return (
        f" train_batch_size {check.user['train_batch_size']} is micro-batch {train.micro_batch_size} x accumulation "
        f"{train.grad_accum} x {processes} processes: the file was made for {processes} processes and this run has "
        f"{check.world_size}. lumina-ds derives train_batch_size for the processes there are: drop it, or keep "
        "train_micro_batch_size_per_gpu and gradient_accumulation_steps beside it (a whole config for another world)."
    )
