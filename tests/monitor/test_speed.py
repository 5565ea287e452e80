"""Speed in the log records: tokens/s per device, TFLOP/s from the FLOP count of benchmarks/throughput.py, MFU."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

from lumina_ds.cli.train import resolve_peak_tflops
from lumina_ds.config.run import RunConfig
from lumina_ds.errors import ConfigError
from lumina_ds.models.config import ModelConfig, MoEConfig
from lumina_ds.models.counting import count_parameters
from lumina_ds.monitor.callbacks import ConsoleLogger
from lumina_ds.monitor.speed import Throughput

# h32, 2 layers, 4 heads of 8 (2 KV heads), 4 experts of width 16, top-2, vocab 64 (tied), 16 tokens per row
SMALL = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=16,
                    moe=MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=16))  # fmt: skip


def hand_flops_per_token() -> float:
    """6 x (active weights a token passes through + the output projection) + 12 x layers x width x seq_len."""
    attention = 32 * 32 + 2 * (32 * 16) + 32 * 32  # q, k and v (2 KV heads of 8), o
    norms = 2 * 32  # two RMSNorms per layer
    router = 32 * 4
    experts = 2 * 3 * 32 * 16  # top-2 of the SwiGLU experts
    compute = 2 * (attention + norms + router + experts) + 32 + 64 * 32  # + final norm, + lm_head (tied)
    return 6.0 * compute + 12.0 * 2 * 32 * 16


def record(tokens_per_s: float) -> dict[str, Any]:
    return {"tokens_per_s": tokens_per_s}


def test_the_flop_count_is_the_hand_count() -> None:
    assert count_parameters(SMALL, seq_len=16).flops_per_token == hand_flops_per_token() == 100_800.0


def test_tflops_per_device_and_mfu() -> None:
    flops = count_parameters(SMALL, seq_len=16).flops_per_token
    no_peak = record(3.0e6)  # all ranks' tokens/s over 2 ranks: 1.5e6 per device
    Throughput(flops_per_token=flops, world_size=2, peak_tflops=None).on_log(no_peak)
    assert no_peak["tokens_per_s_per_device"] == 1.5e6
    assert no_peak["tflops"] == pytest.approx(100_800 * 1.5e6 / 1e12)  # 0.1512 TFLOP/s
    assert no_peak["mfu"] is None  # a CPU: no known peak
    given = record(3.0e6)
    Throughput(flops_per_token=flops, world_size=2, peak_tflops=0.5).on_log(given)
    assert given["mfu"] == pytest.approx(0.1512 / 0.5)


def test_console_shows_speed_and_says_why_mfu_is_missing() -> None:
    m = {"epoch": 0, "step": 1, "total_steps": 2, "elapsed_s": 6.0, "eta_s": 6.0, "loss": 1.0, "lm_loss": 1.0,
         "ppl": 2.7, "lr": 1e-3, "beta2": 0.95, "grad_norm": 0.5, "tokens_per_s": 2000.0, "memory": "CPU"}  # fmt: skip
    Throughput(flops_per_token=1e9, world_size=2, peak_tflops=None).on_log(m)
    out = io.StringIO()
    ConsoleLogger(progress_bar=False, stream=out).on_log(m)
    assert "Tokens/s: 2,000 (1,000/device) | TFLOP/s: 1 | MFU: n/a (no known peak)" in out.getvalue()
    m["mfu"] = 0.4
    out = io.StringIO()
    ConsoleLogger(progress_bar=False, stream=out).on_log(m)
    assert "MFU: 40.0%" in out.getvalue()


@pytest.mark.parametrize(
    ("device", "peak"),
    [("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
     ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("Tesla V100-SXM2-32GB", 125.0),
     ("NVIDIA GeForce GTX 1080", None)],
)  # fmt: skip
def test_the_peak_is_the_gpus_dense_bf16_peak(monkeypatch: pytest.MonkeyPatch, device: str, peak: float) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: device)
    run = RunConfig()
    resolve_peak_tflops(run, local_rank=0)
    assert run.logging.peak_tflops == peak  # V100 has no bf16: its fp16 peak
    run.logging.peak_tflops = 400.0  # --peak-tflops wins over the table
    resolve_peak_tflops(run, local_rank=0)
    assert run.logging.peak_tflops == 400.0


def test_no_peak_on_a_cpu_and_a_given_peak_must_be_positive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = RunConfig()
    resolve_peak_tflops(run, local_rank=0)
    assert run.logging.peak_tflops is None
    run.logging.peak_tflops = 0.0
    with pytest.raises(ConfigError, match="peak_tflops"):
        run.logging.validate()
