"""The only place that calls deepspeed.initialize: model + RunConfig -> a DeepSpeed engine, and the slice of that
engine the rest of training uses (`Engine`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from lumina_ds.config.run import RunConfig
from lumina_ds.distributed.ds_config import build_ds_config
from lumina_ds.distributed.env import DistInfo
from lumina_ds.distributed.expert_parallel import attach_router_hooks
from lumina_ds.distributed.group_timeout import groups_wait
from lumina_ds.distributed.parallelize import parallelize
from lumina_ds.errors import ConfigError
from lumina_ds.models.transformer import ModelOutput, Transformer
from lumina_ds.training.schedule import schedule_for


class Engine(Protocol):
    """What the train module, the trainer and the checkpoints use of `deepspeed.DeepSpeedEngine`."""

    device: torch.device
    module: nn.Module
    optimizer: Any

    def __call__(
        self, input_ids: torch.Tensor, *, labels: torch.Tensor, position_ids: torch.Tensor
    ) -> ModelOutput: ...  # fmt: skip

    def backward(self, loss: torch.Tensor) -> Any: ...

    def step(self) -> None: ...

    def gradient_accumulation_steps(self) -> int: ...

    def train_micro_batch_size_per_gpu(self) -> int: ...

    def get_global_grad_norm(self) -> float | None: ...

    def get_lr(self) -> list[float]: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any], save_latest: bool) -> Any: ...

    def load_checkpoint(self, load_dir: str, tag: str) -> tuple[str | None, dict[str, Any] | None]: ...

    def was_step_applied(self) -> bool: ...


@dataclass
class EngineBundle:
    engine: Engine  # a deepspeed.DeepSpeedEngine
    model: Transformer  # the module inside the engine (experts possibly replaced)
    precision: str
    ds_config: dict[str, Any]  # the complete DeepSpeed JSON the engine was initialised with


def _shape_of(param: nn.Parameter) -> torch.Size:
    return torch.Size(getattr(param, "ds_shape", param.shape))  # ZeRO-3 params are flat placeholders


def optimizer_name(run: RunConfig, precision: str) -> str:
    """What steps the weights: DeepSpeed's CPU Adam for offloaded states (bf16 moments under pure bf16), else torch's
    AdamW on the device."""
    if run.distributed.offload == "none":
        return "torch AdamW"
    return f"DeepSpeedCPUAdam ({'bf16' if precision == 'bf16' else 'fp32'} states on the host)"


def optimizer_factory(model: Transformer, run: RunConfig, *, precision: str) -> Any:
    """AdamW over the module's parameters as they are when DeepSpeed calls it (after AutoEP replacement).

    Weight decay skips vectors (norms); expert parameters get their own groups so ZeRO 1/2 reduce them over
    the expert-data-parallel group only. torch's fused AdamW on GPUs and CPUs alike (the fastest of torch's three on
    the CPU too: benchmarks/NOTES.md). With offload it is DeepSpeed's CPU Adam: torch's AdamW steps the host-resident
    states several times slower (NOTES), and pure bf16 with offload is refused by DeepSpeed with anything else.
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    train = run.train

    def build(_params: Any) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if len(_shape_of(p)) >= 2]
        no_decay = [p for p in params if len(_shape_of(p)) < 2]
        groups = [
            {"params": decay, "weight_decay": train.weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]
        groups = split_params_into_different_moe_groups_for_optimizer([g for g in groups if g["params"]])
        lr, betas, eps = train.learning_rate, (train.beta1, train.beta2), train.eps
        if run.distributed.offload == "none":
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        states_fp32 = precision != "bf16"  # pure bf16 keeps its moments in bf16 (DeepSpeed refuses fp32 ones there)
        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True, fp32_optimizer_states=states_fp32)

    return build


def initialize_partitioned(model: Transformer) -> None:
    """Our initialisation, module by module with only that module's parameters gathered (rank 0's values win).

    Under zero.Init each submodule is partitioned when its constructor returns, so the reset_parameters call at
    the end of Transformer.__init__ saw empty placeholders and drew no random numbers. Walking the modules in the
    same order with the same seed draws the same numbers: the weights equal those of a plain build.
    """
    import deepspeed

    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            model.init_module(name, module)


def build_model(run: RunConfig, *, world_size: int, precision: str) -> Transformer:
    """The model as the run's ZeRO stage needs it: at stage 3 built partitioned (deepspeed.zero.Init), so no
    rank ever holds all parameters; otherwise a plain full build (every rank holds the model in fp32 until
    DeepSpeed casts and shards it)."""
    if run.distributed.zero_stage != 3:
        return Transformer(run.model)
    import deepspeed

    ds_config = build_ds_config(run, world_size=world_size, precision=precision)
    deepspeed.zero.Init.param_id = 0  # NVMe swap files are named by these ids: number every model as a fresh process
    with groups_wait(run.distributed.timeout_minutes), deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = Transformer(run.model)  # zero.Init creates the hpZ groups when the extras ask for them
    initialize_partitioned(model)
    return model


def build_engine(
    model: Transformer,
    run: RunConfig,
    *,
    info: DistInfo,
    total_steps: int,
    precision: str,
    load_universal: bool = False,
) -> EngineBundle:
    """`precision` as resolved by `select_precision` (never "auto"); the layout passed the pre-flight.
    `load_universal`: the engine will load a universal checkpoint (an elastic resume, training/elastic.py)."""
    import deepspeed

    sections = parallelize(model, run, rank=info.rank)
    ds_config = build_ds_config(run, world_size=info.world_size, precision=precision)
    ds_config.update(sections)
    if load_universal:  # DeepSpeed reads it at initialize: the engine then loads only universal checkpoints
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    schedule = schedule_for(run.train, total_steps)
    try:  # DeepSpeed creates its data-, expert- and expert-data-parallel groups in there
        with groups_wait(run.distributed.timeout_minutes):
            engine, _, _, _ = deepspeed.initialize(
                model=model,
                optimizer=optimizer_factory(model, run, precision=precision),
                lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
                config=ds_config,
            )
    except (ValueError, AssertionError) as exc:
        raise ConfigError(
            "E002", f"DeepSpeed rejected the configuration: {exc}", f"generated config: {json.dumps(ds_config)}"
        ) from exc
    if run.model.moe.enabled:
        attach_router_hooks(engine.module)
    return EngineBundle(engine=engine, model=engine.module, precision=precision, ds_config=ds_config)
