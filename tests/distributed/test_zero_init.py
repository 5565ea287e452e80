"""ZeRO-3 builds the model partitioned (deepspeed.zero.Init) with the same initial weights as a plain build."""

from __future__ import annotations

from typing import Any

import deepspeed
import torch

from lumina_ds.config.presets import get_preset
from lumina_ds.distributed.env import DistInfo
from lumina_ds.models.transformer import Transformer
from lumina_ds.training.engine import build_engine, build_model


def test_zero3_build_is_partitioned_and_equals_plain_init(process_group: DistInfo) -> None:
    run = get_preset("debug")
    torch.manual_seed(0)
    plain = dict(Transformer(run.model).named_parameters())
    run.distributed.zero_stage = 3
    torch.manual_seed(0)
    model = build_model(run, world_size=1, precision="fp32")
    params = dict(model.named_parameters())
    assert params.keys() == plain.keys()
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in params.values())  # partitioned placeholders
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, p in params.items():
            assert torch.equal(p, plain[name]), name
    assert model.lm_head.weight is model.embed.weight  # still tied
    run.distributed.zero_stage = 2
    assert not hasattr(next(build_model(run, world_size=1, precision="fp32").parameters()), "ds_id")


def test_zero3_bf16_keeps_fp32_rope_and_buffers(process_group: DistInfo) -> None:
    """zero.Init builds floating tensors in the config's dtype and the bf16 engine casts the module: the rotary
    angles must still be the fp32 ones that chat and export rebuild, bit for bit."""
    run = get_preset("debug")
    run.model.rope_theta, run.model.max_seq_len = 5e5, 8192  # b50's theta, where bf16 frequencies go wrong
    torch.manual_seed(0)
    plain = Transformer(run.model)
    run.distributed.zero_stage, run.train.precision = 3, "bf16"
    torch.manual_seed(0)
    engine: Any = build_engine(build_model(run, world_size=1, precision="bf16"), run, info=process_group,
                               total_steps=1, precision="bf16").engine  # fmt: skip
    module = engine.module
    assert next(module.parameters()).dtype == torch.bfloat16  # DeepSpeed cast the module
    buffers = dict(module.named_buffers())
    for name, buf in plain.named_buffers():
        if buf.dtype == torch.float32:
            assert buffers[name].dtype == torch.float32 and torch.equal(buffers[name].cpu(), buf), name
    pos = torch.tensor([[0, 1, 1000, 4095, 4096, 8191]])
    for ours, ref in zip(module.rope(pos), plain.rope(pos), strict=True):
        assert ours.dtype == torch.float32 and torch.equal(ours.cpu(), ref), (ours - ref).abs().max()
