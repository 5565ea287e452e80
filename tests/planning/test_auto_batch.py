"""--auto-batch-size: the largest micro-batch the memory model fits, with the global batch kept."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lumina_ds.cli.train import size_micro_batch
from lumina_ds.config.presets import get_preset
from lumina_ds.planning.auto_batch import layout_of, pick_micro_batch
from lumina_ds.planning.memory import estimate_memory
from lumina_ds.planning.memory_inputs import GIB


def predicted(run, micro: int) -> float:  # type: ignore[no-untyped-def]
    layout = layout_of(run, micro_batch_size=micro, world_size=8, ranks_per_node=8, precision="mixed_bf16")
    return estimate_memory(run.model, layout).gpu_total


def test_the_largest_divisor_that_fits_is_picked_and_accumulation_makes_up_for_it() -> None:
    run = get_preset("b1")
    run.train.micro_batch_size, run.train.grad_accum = 12, 2  # 24 rows per rank and step
    sizes = {m: predicted(run, m) for m in (24, 12, 8, 6)}
    assert sizes[24] > sizes[12] > sizes[8] > sizes[6]  # activations grow with the micro-batch
    device = (sizes[8] + sizes[12]) / 2 / 0.9  # 8 fits in 90% of it, 12 does not
    pick = pick_micro_batch(run, device_bytes=device, target=0.9, world_size=8, ranks_per_node=8,
                            precision="mixed_bf16")  # fmt: skip
    assert (pick.micro_batch_size, pick.grad_accum, pick.fits) == (8, 3, True)
    assert pick.predicted_bytes == pytest.approx(sizes[8])
    roomy = pick_micro_batch(run, device_bytes=sizes[24] * 2, target=0.9, world_size=8, ranks_per_node=8,
                             precision="mixed_bf16")  # fmt: skip
    assert (roomy.micro_batch_size, roomy.grad_accum) == (24, 1)


def test_when_nothing_fits_micro_batch_1_is_used_and_the_line_says_so() -> None:
    run = get_preset("b1")
    pick = pick_micro_batch(run, device_bytes=GIB, target=0.9, world_size=8, ranks_per_node=8, precision="mixed_bf16")
    assert pick.micro_batch_size == 1 and not pick.fits
    assert "does NOT fit 90% of 1.0 GiB" in pick.describe(GIB, 0.9)


def test_the_train_flag_reads_the_gpu_memory_and_changes_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    run = get_preset("b1")
    run.train.micro_batch_size, run.train.grad_accum = 12, 2
    device = (predicted(run, 8) + predicted(run, 12)) / 2 / 0.9
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=device))
    monkeypatch.setattr("lumina_ds.distributed.ds_config.hardware_precision", lambda: (True, True))
    line = size_micro_batch(run, world_size=8, ranks_per_node=8, local_rank=3)
    assert (run.train.micro_batch_size, run.train.grad_accum) == (8, 3)
    assert line.startswith("--auto-batch-size: micro-batch 8 x accumulation 3, predicted")


def test_without_a_gpu_the_flag_keeps_the_micro_batch_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = get_preset("debug")
    before = (run.train.micro_batch_size, run.train.grad_accum)
    line = size_micro_batch(run, world_size=1, ranks_per_node=1, local_rank=0)
    assert (run.train.micro_batch_size, run.train.grad_accum) == before and "no GPU here" in line
