"""`train --init-from`: start a run from another model's weights (a lumina-ds run or tag, or a Hugging Face model
directory), with a fresh optimizer and schedule.

The weights are read one tensor at a time and copied in module by module. At ZeRO-3 each module's parameters are
gathered for the copy with rank 0's values winning, so no rank ever holds more than one module of the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lumina_ds.errors import CheckpointError
from lumina_ds.hf.source import ModelSource


def _gathered(params: list[nn.Parameter]) -> contextlib.AbstractContextManager[object]:
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3: rank 0's copy is scattered to every rank on exit
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


def _module_params(model: nn.Module) -> Iterator[tuple[list[tuple[str, nn.Parameter]], bool]]:
    """(each module's own (full name, parameter) pairs, whether they are ZeRO-3 partitioned), tied ones once."""
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        own = []
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                own.append((f"{prefix}.{name}" if prefix else name, param))
        if own:
            yield own, any(hasattr(p, "ds_id") for _, p in own)


def load_initial_weights(model: nn.Module, source: ModelSource, *, rank: int) -> int:
    """Copy every parameter of `model` from `source`; E303 naming what is missing, extra or of the wrong shape.
    Returns the number of elements copied on this rank."""
    missing = [n for n, _ in _all_params(model) if n not in set(source.names)]
    extra = sorted(set(source.names) - {n for n, _ in _all_params(model)})
    if missing or extra:
        problem = f"{source.path} does not match the model: missing {_few(missing)}, unexpected {_few(extra)}"
        raise CheckpointError("E303", problem, "initialise from a model of the same architecture")
    copied = 0
    for params, partitioned in _module_params(model):
        with _gathered([p for _, p in params]):
            if partitioned and rank != 0:
                continue
            for name, param in params:
                copied += _copy_into(param, source.read(name), name=name, source=source.path)
    return copied


def _all_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [pair for params, _ in _module_params(model) for pair in params]


def _copy_into(param: nn.Parameter, tensor: torch.Tensor, *, name: str, source: Path) -> int:
    if tuple(tensor.shape) != tuple(param.shape):
        raise CheckpointError("E303", f"{source}: {name} has shape {tuple(tensor.shape)}, the model needs "
                              f"{tuple(param.shape)}", "initialise from a model of the same architecture")  # fmt: skip
    with torch.no_grad():
        param.data.copy_(tensor.to(param.dtype))
    return tensor.numel()


def _few(names: list[str]) -> str:
    return "none" if not names else ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
