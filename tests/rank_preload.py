"""Imported once by the server the test ranks fork from (tests/runs.py): what every rank would import on its way
through a run (DeepSpeed's engines and ZeRO stages, torch's lazily imported compiler and FSDP modules, the report's
matplotlib, TensorBoard), so that a forked rank starts training at once. Nothing here computes: a server that ran
torch ops would hand its thread pools to children that cannot use them."""

import importlib
import os
import pkgutil

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import lumina_ds

HEAVY = (
    "torch",
    "torch._dynamo",
    "torch.distributed.fsdp",
    "torch.utils.tensorboard",
    "sympy",
    "deepspeed",
    "deepspeed.runtime.engine",
    "deepspeed.runtime.zero.muon.muon_optimizer",  # imported by every ZeRO engine's optimizer check (torch._inductor)
    "deepspeed.runtime.zero.stage3",
    "deepspeed.runtime.zero.stage_1_and_2",
    "deepspeed.runtime.bf16_optimizer",
    "deepspeed.moe.layer",
    "deepspeed.checkpoint",
    "deepspeed.ops.op_builder",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "safetensors.torch",
    "tokenizers",
)
for name in HEAVY:
    importlib.import_module(name)
for module in pkgutil.walk_packages(lumina_ds.__path__, "lumina_ds."):
    if not module.name.endswith("__main__"):  # running the package would run the command line
        importlib.import_module(module.name)
