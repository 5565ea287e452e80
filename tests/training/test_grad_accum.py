"""Gradient accumulation through the real DeepSpeed engine (this process, a one-rank gloo group).

The loop tests use a fake engine, and Adam's first step is nearly blind to the loss scale, so an extra division of
the loss by the accumulation steps passed them. Here, through the train module, micro-batch 4 x accumulation 1 and
micro-batch 2 x accumulation 2 over the same 4 rows must give the same gradient norm (equal to a plain-torch
forward/backward of the 4 rows) and the same weights after one optimizer step.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lumina_ds.batch import Batch
from lumina_ds.config.presets import get_preset
from lumina_ds.config.run import RunConfig
from lumina_ds.distributed.env import DistInfo
from lumina_ds.models.transformer import Transformer
from lumina_ds.training.engine import build_engine, build_model
from lumina_ds.training.train_module import TrainModule

SETTINGS = ((4, 1), (2, 2))  # (micro-batch, accumulation): the same 4 rows per optimizer step
ROWS, SEQ = 4, 32
Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def config(micro: int, accum: int, stage: int) -> RunConfig:
    run = get_preset("debug")
    run.train.micro_batch_size, run.train.grad_accum = micro, accum
    run.train.precision, run.distributed.zero_stage = "fp32", stage
    run.train.max_grad_norm = 0.0  # gradient_clipping 0: DeepSpeed reports the raw norm and steps unclipped
    run.train.learning_rate, run.train.warmup_ratio, run.train.lr_scheduler = 1e-2, 0.0, "none"
    # Adam's first step is lr * g / (|g| + eps): with eps 1e-8, a gradient near zero whose last bits differ
    # between batchings (~1e-10) moves its weight by ~lr / 100 differently (measured: 1.8e-4 apart at ZeRO-0)
    run.train.eps = 1e-3
    # only the LM loss: the MoE aux losses are per-micro-batch means of routing statistics, not additive
    run.model.moe.load_balancing_weight = run.model.moe.router_z_loss_weight = 0.0
    return run


def rows(vocab: int) -> Rows:
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(6, vocab, (ROWS, SEQ), generator=g)
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    # a masked prompt of different length per row (31 - 5, 31 - 9 | 31 - 7, 31 - 7 targets), but the same 48
    # targets in each half: the mean over 4 rows then equals the mean of the two micro-batch means
    for row, prompt in enumerate((5, 9, 7, 7)):
        labels[row, :prompt] = -100
    assert (labels[:2] != -100).sum() == (labels[2:] != -100).sum() == 48
    return input_ids, labels, torch.arange(SEQ).expand(ROWS, SEQ)


def flat_params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in module.parameters()])


def grad_norm(module: nn.Module) -> float:
    # in float64: a float32 norm over all the gradients is itself off by ~4e-5 relative (measured)
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None]).double().norm().item()


def reference_norm(run: RunConfig, data: Rows) -> float:
    torch.manual_seed(0)
    model = Transformer(run.model)
    input_ids, labels, position_ids = data
    model(input_ids, labels=labels, position_ids=position_ids)["loss"].backward()
    return grad_norm(model)


def one_step(info: DistInfo, micro: int, accum: int, stage: int, data: Rows) -> dict[str, Any]:
    run = config(micro, accum, stage)
    torch.manual_seed(0)
    engine: Any = build_engine(build_model(run, world_size=1, precision="fp32"), run, info=info, total_steps=10,
                               precision="fp32").engine  # fmt: skip
    assert engine.gradient_accumulation_steps() == accum and engine.train_micro_batch_size_per_gpu() == micro
    assert all(group["fused"] for group in engine.basic_optimizer.param_groups)  # torch's fused AdamW, on CPU too
    before = flat_params(engine.module)
    input_ids, labels, position_ids = data
    norm = 0.0
    if stage == 0:
        # ZeRO-0 fp32 steps the torch optimizer itself and DeepSpeed reports no global norm: read the accumulated
        # gradients in p.grad right before the optimizer step
        for i in range(0, ROWS, micro):
            part = slice(i, i + micro)
            out = engine(input_ids[part], labels=labels[part], position_ids=position_ids[part])
            engine.backward(out["loss"])
            if engine.is_gradient_accumulation_boundary():
                norm = grad_norm(engine.module)
            engine.step()
    else:
        # the train module's own step: forward, backward and step of each micro-batch as the training loop runs them
        batches = [Batch(input_ids[i : i + micro], labels[i : i + micro], position_ids[i : i + micro])
                   for i in range(0, ROWS, micro)]  # fmt: skip
        result = TrainModule(engine).train_step(iter(batches), step=1, data_step=1)
        assert result is not None and result.applied
        norm = engine.get_global_grad_norm()
    assert engine.global_steps == 1
    after = flat_params(engine.module)
    return {"norm": float(norm), "moved": (after - before).abs().max().item(), "params": after}


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_accumulated_micro_batches_equal_one_large_batch(process_group: DistInfo, stage: int) -> None:
    base = config(*SETTINGS[0], stage)
    data = rows(base.model.vocab_size)
    reference = reference_norm(base, data)
    assert reference > 0
    (a, b) = (one_step(process_group, micro, accum, stage, data) for micro, accum in SETTINGS)
    # the plain-torch norm of the 4 rows' mean loss: a loss divided once too often shows up here, not in Adam
    assert a["norm"] == pytest.approx(reference, rel=1e-5), f"ZeRO-{stage} 4x1"
    assert b["norm"] == pytest.approx(reference, rel=1e-5), f"ZeRO-{stage} 2x2"
    assert (a["params"] - b["params"]).abs().max().item() <= 1e-6, f"ZeRO-{stage}: weights after one step differ"
    assert min(a["moved"], b["moved"]) > 1e-4, f"ZeRO-{stage}: the step did not move the weights"


ACC, MICRO, BF16_SEQ = 16, 2, 64


def summed_gradient(info: DistInfo, stage: int, precision: str, accum_dtype: str | None = None) -> tuple[Any, Any]:
    from deepspeed.utils import safe_get_full_grad

    run = get_preset("debug")
    run.train.micro_batch_size, run.train.grad_accum, run.train.max_grad_norm = MICRO, ACC, 0.0
    run.distributed.zero_stage, run.train.precision = stage, precision
    if accum_dtype:  # the DeepSpeed default lumina-ds overrides (validation would refuse the key: tests only)
        run.distributed.deepspeed = {"data_types": {"grad_accum_dtype": accum_dtype}}
    torch.manual_seed(0)
    bundle = build_engine(build_model(run, world_size=1, precision=precision), run, info=info, total_steps=10,
                          precision=precision)  # fmt: skip
    engine: Any = bundle.engine
    g = torch.Generator().manual_seed(1)
    for i in range(ACC):
        ids = torch.randint(6, 2048, (MICRO, BF16_SEQ), generator=g)
        positions = torch.arange(BF16_SEQ).expand(MICRO, BF16_SEQ)
        engine.backward(engine(ids, labels=torch.roll(ids, -1, 1), position_ids=positions)["loss"])
        if i < ACC - 1:
            engine.step()
    grad = torch.cat([safe_get_full_grad(p).float().flatten() for p in engine.module.parameters()])
    return grad, bundle.ds_config.get("data_types")


def test_mixed_bf16_sums_accumulated_gradients_in_fp32(process_group: DistInfo) -> None:
    """DeepSpeed sums micro-batch gradients in bf16 unless told otherwise: over 16 micro-batches that drifted from
    the fp32 sum (0.99% against 0.87% with fp32 sums; the rest is bf16 compute, the same in both)."""
    ref, _ = summed_gradient(process_group, 0, "fp32")
    for stage in (1, 2):
        ours, data_types = summed_gradient(process_group, stage, "mixed_bf16")
        bf16_sums, _ = summed_gradient(process_group, stage, "mixed_bf16", "bf16")
        distance = {
            "ours": float((ours - ref).norm() / ref.norm()),
            "bf16": float((bf16_sums - ref).norm() / ref.norm()),
        }
        assert data_types == {"grad_accum_dtype": "fp32"}, stage
        assert distance["ours"] < distance["bf16"] - 0.0005, (stage, distance)  # closer to fp32 by a clear margin
