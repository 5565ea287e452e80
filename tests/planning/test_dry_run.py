"""Meta-device dry run of every preset on its reference cluster, and the training-time estimate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lumina_ds.cli import main
from lumina_ds.config.presets import PRESETS, get_preset
from lumina_ds.errors import ConfigError
from lumina_ds.planning.dry_run import dry_run, format_dry_run
from lumina_ds.planning.estimate_time import count_tokens, estimate_time
from lumina_ds.planning.hardware import peak_flops
from lumina_ds.planning.layouts import REFERENCE_CLUSTERS


@pytest.mark.parametrize("preset", list(PRESETS))
def test_dry_run_every_preset(preset: str) -> None:
    run = get_preset(preset)
    result = dry_run(run, REFERENCE_CLUSTERS[preset])
    counts = result.counts
    assert sum(counts.by_component.values()) == counts.total
    assert counts.by_component["experts"] > 0 and counts.by_component["router"] > 0
    if run.model.moe.num_shared_experts:
        assert counts.by_component["shared_experts"] > 0
    model = run.model
    attention = 12 * model.num_layers * model.hidden_size * result.plan.seq_len
    assert result.attention_flops_per_token == attention
    assert counts.flops_per_token > 6 * (counts.active - counts.by_component["embedding"])  # + attention + head
    assert result.ds_config["train_batch_size"] == result.plan.global_batch
    assert "pre-flight: ok" in format_dry_run(result)


def test_dry_run_b300_named_sizes() -> None:
    result = dry_run(get_preset("b300"), REFERENCE_CLUSTERS["b300"])
    assert 290e9 < result.counts.total < 300e9  # the name
    # 144 experts, top-2: about 2/144 of the expert parameters are active per token
    experts = result.counts.by_component["experts"]
    assert result.counts.total - result.counts.active == experts - experts * 2 // 144
    assert "18 experts per rank (EP 8)" in result.model_summary


def test_estimate_time_arithmetic(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"x" * 4_000_000)
    tokens = count_tokens(str(data))
    assert tokens.tokens == 1_000_000  # ~4 bytes per token without a tokenizer
    est = estimate_time(tokens=1e9, flops_per_token=1e10, epochs=2, gpus=8, gpu="h100", precision="auto", mfu=0.5)
    assert est.seconds == pytest.approx(2e19 / (8 * 989e12 * 0.5))
    assert peak_flops("a100", "mixed_bf16") == 312e12 and peak_flops("v100", "mixed_fp16") == 125e12
    assert peak_flops("A100-80GB", "mixed_bf16") == 312e12  # LuminaAI's --hardware-profile spelling
    with pytest.raises(ConfigError):
        peak_flops("v100", "bf16")  # no bf16 tensor cores


def test_scale_commands_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--preset", "b7", "--nodes", "1", "--json"]) == 0
    assert '"zero_stage"' in capsys.readouterr().out
    assert main(["analyze-memory", "--preset", "b14", "--zero-stage", "3", "--batch-size", "2",
                 "--sequence-length", "4096", "--gpus", "8"]) == 0  # fmt: skip
    assert "optimizer" in capsys.readouterr().out
    assert main(["plan", "--preset", "b300", "--nodes", "1", "--gpu-mem-gb", "80"]) == 1
    assert "[E202]" in capsys.readouterr().err
    assert main(["analyze-memory", "--preset", "debug", "--gpus", "2", "--expert-parallel-size", "3"]) == 1
    assert "[E002]" in capsys.readouterr().err  # 3 does not divide 4 experts: the config alone says so
    assert main(["analyze-memory", "--preset", "debug", "--gpus", "3", "--expert-parallel-size", "2"]) == 1
    assert "[E203]" in capsys.readouterr().err  # 3 GPUs cannot hold groups of 2: the world size says so


@pytest.mark.parametrize(
    ("device_name", "key", "bf16_tflops"),
    [
        ("NVIDIA A10G", "a10g", 70),  # matched "A10" before: 125
        ("NVIDIA A10", "a10", 125),
        ("NVIDIA H100 NVL", "h100-nvl", 835),  # matched the SXM part before: 989
        ("NVIDIA H100 PCIe", "h100-pcie", 756),
        ("NVIDIA H100 80GB HBM3", "h100", 989),
        ("NVIDIA H200", "h200", 989),
        ("NVIDIA B200", "b200", 2250),
        ("NVIDIA A100-SXM4-80GB", "a100", 312),
    ],
)
def test_one_gpu_table_matches_device_names_most_specific_first(device_name: str, key: str, bf16_tflops: int) -> None:
    from lumina_ds.planning.hardware import gpu_spec, gpu_spec_of_device

    spec = gpu_spec_of_device(device_name)
    assert spec is not None and spec.key == key and spec.bf16 == bf16_tflops * 1e12
    assert gpu_spec(key) is spec and peak_flops(key, "mixed_bf16") == bf16_tflops * 1e12
    assert gpu_spec("H100-NVL-94GB").key == "h100-nvl"  # a LuminaAI-style profile keeps its most specific match


def test_plan_uses_the_memory_torch_reports(capsys: pytest.CaptureFixture[str]) -> None:
    """An 80 GB H100 shows 79.1 GiB to torch: planning against 80 would call a layout that does not fit a fit."""
    assert main(["plan", "--preset", "b7", "--nodes", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cluster"]["gpu_mem_gb"] == 79.1
    assert main(["plan", "--preset", "b7", "--nodes", "1", "--gpu", "h200", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cluster"]["gpu_mem_gb"] == 139.8
