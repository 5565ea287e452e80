"""The throughput benchmark runs end to end on a tiny config (no wall-clock assertions: benchmarks are not tests)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType

import pytest

from tests.benchmarks.conftest import load_benchmark

TINY = [
    "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--experts", "4", "--top-k", "2",
    "--expert-ffn", "32", "--vocab", "128", "--batch-size", "2", "--seq-len", "16", "--steps", "2", "--warmup", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def throughput() -> ModuleType:
    return load_benchmark("throughput")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_both_peers_write_records(throughput: ModuleType, tmp_path: Path, precision: str) -> None:
    out = tmp_path / "results.jsonl"
    returned = throughput.main([*TINY, "--precision", precision, "--threads", "2", "--output", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["impl"] for r in records] == ["lumina", "mixtral"]
    assert [r["impl"] for r in returned] == ["lumina", "mixtral"]
    for r in records:
        for key in ("device", "torch", "timestamp", "config", "params_total", "params_active", "step_ms_median",
                    "peak_mem_bytes", "peak_mem_kind", "flops_per_token", "tflops", "mfu"):  # fmt: skip
            assert key in r, key
        assert r["precision"] == precision
        assert r["config"]["model"]["hidden_size"] == 32 and r["config"]["batch_size"] == 2
        assert r["tokens_per_s"] > 0
        assert math.isfinite(r["final_loss"])
        assert math.isclose(r["tflops"], r["flops_per_token"] * r["tokens_per_s"] / 1e12, rel_tol=1e-9)
    lumina, mixtral = records
    assert lumina["flops_per_token"] == mixtral["flops_per_token"]  # one count for the shared architecture
    assert lumina["params_total"] == mixtral["params_total"]  # the peer is the same architecture
    assert lumina["params_active"] == mixtral["params_active"]


def test_interleave_and_ceiling(throughput: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    records = throughput.main([*TINY, "--threads", "2", "--interleave", "--ceiling"])
    for r in records:
        assert r["interleaved_ms_median"] > 0 and r["ceiling_tflops"] > 0
    out = capsys.readouterr().out
    assert "interleaved: lumina" in out and "% of the matmul ceiling" in out and "peak memory:" in out


def test_flops_per_token_is_ours(throughput: ModuleType) -> None:
    from lumina_ds.models.counting import count_parameters

    mc = throughput.model_config_from_args(throughput.parse_args(TINY))
    assert mc.moe.num_shared_experts == 0 and mc.hidden_size == 32 and mc.moe.num_experts == 4
    assert count_parameters(mc, seq_len=16).flops_per_token > 0


def test_mfu_peak_table(throughput: ModuleType) -> None:
    """MFU uses the planner's one GPU table (the benchmark kept its own, which called an A10G an A10)."""
    names = ("NVIDIA H100 PCIe", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA A10", "NVIDIA A10G")
    lookup = [throughput.gpu_spec_of_device(name).bf16 / 1e12 for name in names]
    assert lookup == [756.0, 989.0, 312.0, 125.0, 70.0]
    assert throughput.gpu_spec_of_device("NVIDIA H200").bf16 == 989e12
