"""Memory model: hand-computed cases, and agreement with DeepSpeed's own model-state estimators."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from lumina_ds.config.presets import get_preset
from lumina_ds.models.counting import count_parameters
from lumina_ds.planning.activations import activation_bytes, layer_activation_bytes
from lumina_ds.planning.memory import comm_buffer_bytes, estimate_memory, host_bytes, model_state_bytes
from lumina_ds.planning.memory_inputs import HOST_BUFFER_FACTOR, Layout, ParamInventory, precision_bytes

P = 1_000_000_000  # a dense 1B model
LARGEST = 50_000_000
DENSE = ParamInventory(dense_sizes=(P,), expert_sizes=(), largest_dense_module=LARGEST, largest_expert_module=0)


def dense_layout(stage: int, gpus: int, **kw: object) -> Layout:
    """DeepSpeed's estimators' assumptions: 16-bit params + fp32 Adam, no buckets, nothing kept whole."""
    base = dict(zero_stage=stage, gpus=gpus, gpus_per_node=min(gpus, 8), precision="mixed_bf16",
                reduce_bucket_size=0, prefetch_bucket_size=0, persistence_threshold=0)  # fmt: skip
    base.update(kw)
    return Layout(**base)  # type: ignore[arg-type]


def with_recompute_peak(acts: dict[str, float]) -> float:
    """What a forward stores and the one layer backward rematerialises at a time."""
    return acts["activations"] + acts["recompute"]


def states_and_live(layout: Layout, inv: ParamInventory = DENSE) -> float:
    return sum(model_state_bytes(inv, layout).values()) + comm_buffer_bytes(inv, layout)


def test_precision_bytes_per_mode() -> None:
    mixed = precision_bytes("mixed_bf16", 2)
    assert (mixed.param, mixed.grad, mixed.optimizer_side) == (2, 2, 16)  # fp32 master + fp32 grad + m + v
    assert precision_bytes("mixed_fp16", 1) == mixed == precision_bytes("fp16", 3)
    pure = precision_bytes("bf16", 1)
    assert (pure.param, pure.grad, pure.optimizer_side) == (2, 2, 8)  # bf16 master, grads, m and v
    assert precision_bytes("fp32", 0).optimizer_side == 8  # plain torch AdamW updates the params in place
    assert precision_bytes("fp32", 2).optimizer_side == 16  # ZeRO clones an fp32 master partition
    with pytest.raises(AssertionError):  # RunConfig.validate refuses it (E002); here it is an invariant
        precision_bytes("bf16", 0)


@pytest.mark.parametrize("gpus", [1, 8, 64])
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_agrees_with_deepspeed_estimator(gpus: int, offload: bool) -> None:
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cpu, gpu = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=gpus, num_nodes=1, cpu_offload=offload)
    layout = dense_layout(2, gpus, gpus_per_node=gpus, offload_optimizer=offload)
    assert states_and_live(layout) == pytest.approx(gpu, abs=1)
    assert host_bytes(DENSE, layout)["construction"] == pytest.approx(4 * P * gpus * HOST_BUFFER_FACTOR)
    assert max(host_bytes(DENSE, layout).values()) == pytest.approx(cpu, rel=1e-9)


@pytest.mark.parametrize(("nodes", "per_node"), [(1, 8), (4, 8), (32, 8)])
def test_zero3_offload_agrees_with_deepspeed_estimator(nodes: int, per_node: int) -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    for offload_param in (False, True):
        cpu, gpu, largest = estimate_zero3_model_states_mem_needs(
            P, LARGEST, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=True,
            cpu_offload_params=offload_param,
        )  # fmt: skip
        layout = dense_layout(3, nodes * per_node, gpus_per_node=per_node, offload_optimizer=True,
                              offload_param=offload_param)  # fmt: skip
        assert states_and_live(layout) == pytest.approx(gpu, abs=1)
        assert host_bytes(DENSE, layout)["offloaded_states"] == pytest.approx(cpu, rel=1e-9)
        assert largest == 4 * LARGEST


@pytest.mark.parametrize("gpus", [8, 64, 256])
def test_zero3_without_offload_adds_the_16bit_gradient_partition(gpus: int) -> None:
    """DeepSpeed's estimator counts 18 bytes/param; stage3.py also keeps a 16-bit gradient partition (2 more)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        P, LARGEST, num_gpus_per_node=8, num_nodes=gpus // 8, cpu_offload=False
    )
    layout = dense_layout(3, gpus)
    assert states_and_live(layout) == pytest.approx(gpu + 2 * P / gpus, abs=1)
    assert host_bytes(DENSE, layout)["construction"] == pytest.approx(cpu)  # zero.Init: one module at a time


def test_experts_divide_by_expert_parallel_and_zero_shards_over_the_rest() -> None:
    dense, experts = 10_000_000, 640_000_000  # e.g. 64 experts of 10M
    inv = ParamInventory((dense,), (experts,), largest_dense_module=dense, largest_expert_module=experts)
    z1 = Layout(zero_stage=1, gpus=64, expert_parallel_size=8, precision="mixed_bf16")
    states = model_state_bytes(inv, z1)
    assert states["parameters"] == 2 * (dense + experts / 8)  # all dense params, 1/8 of the experts
    assert states["gradients"] == 2 * (dense + experts / 8)  # ZeRO-1 keeps full gradients
    # optimizer: dense / 64 ranks + (experts / 8) / (64 / 8 expert-data-parallel ranks)
    assert states["optimizer"] == pytest.approx(16 * (dense / 64 + experts / 8 / 8))
    z3 = Layout(zero_stage=3, gpus=64, expert_parallel_size=8, persistence_threshold=0, prefetch_bucket_size=0,
                reduce_bucket_size=0)  # fmt: skip
    assert comm_buffer_bytes(inv, z3) == 4 * experts / 8  # one layer's local experts gathered (params + grads)


def test_inventory_matches_parameter_count() -> None:
    for name in ("debug", "b7"):
        model = get_preset(name).model
        inv, count = ParamInventory.of(model), count_parameters(model)
        assert inv.total == count.total
        assert inv.experts == count.by_component["experts"]
    debug = ParamInventory.of(get_preset("debug").model)
    assert debug.largest_expert_module == 3 * 4 * 48 * 128  # w1, w2, w3 of 4 experts, ffn 48, hidden 128
    assert debug.largest_dense_module == 2048 * 128  # the (tied) embedding


def test_attention_term_is_korthikanti_and_recompute_keeps_layer_inputs() -> None:
    model = get_preset("b7").model
    s, b, h, a = 4096, 2, model.hidden_size, model.num_heads
    plain = Layout(zero_stage=3, gpus=8, micro_batch_size=b, seq_len=s, attention_scores_stored=True)
    dense_ffn = (h + 4 * model.intermediate_size) * s * b * 2
    model.moe.num_experts = 0  # a dense layer: attention + norms + SwiGLU
    expected = s * b * h * 15 + 5 * a * s * s * b + dense_ffn  # Korthikanti 11sbh + 4sbh + 5as^2b, 16-bit
    assert layer_activation_bytes(model, plain, moe_layer=False) == pytest.approx(expected)
    ckpt = Layout(zero_stage=3, gpus=8, micro_batch_size=b, seq_len=s, recompute="full")
    one_layer = layer_activation_bytes(model, ckpt, moe_layer=False)
    stored = with_recompute_peak(activation_bytes(model, ckpt))
    # auto runs flash-attn or flex on a GPU: no [B, 1, S, S] mask
    assert stored == pytest.approx(model.num_layers * 2 * s * b * h + one_layer)  # 2sbh per layer
    model.attention_backend = "sdpa"  # the bool mask once, and SDPA's 16-bit bias in each layer that holds one
    with_recompute = with_recompute_peak(activation_bytes(model, ckpt))
    assert with_recompute - stored == pytest.approx(b * s * s * (1 + 2))  # only the layer being recomputed
    no_recompute = Layout(zero_stage=3, gpus=8, micro_batch_size=b, seq_len=s)
    model.attention_backend = "auto"
    auto = with_recompute_peak(activation_bytes(model, no_recompute))
    model.attention_backend = "sdpa"
    assert with_recompute_peak(activation_bytes(model, no_recompute)) - auto == pytest.approx(
        b * s * s * (1 + 2 * model.num_layers)
    )


def test_logits_and_fp32_activations() -> None:
    model = get_preset("debug").model
    layout = Layout(zero_stage=0, gpus=1, micro_batch_size=8, seq_len=256, precision="fp32")
    acts = activation_bytes(model, layout)
    # the chunked loss: 2^22 logits per chunk = all 2048 tokens at vocab 2048, in one fp32 buffer that the softmax and
    # its gradient overwrite (an fp32 weight needs no copy and no scratch); the hidden-state gradient [2048, 128] and
    # the head's fp32 weight gradient [2048, 128] kept for backward
    assert acts["logits"] == 2048 * 2048 * 4 + 2048 * 128 * 4 + 2048 * 128 * 4
    assert acts["moe_dispatch"] == 0.0  # ep 1: our own block, no all-to-all buffers


def test_chunked_loss_holds_one_chunk_of_logits_at_a_large_vocabulary() -> None:
    model = replace(get_preset("debug").model, vocab_size=65_536)
    layout = Layout(zero_stage=0, gpus=1, micro_batch_size=4, seq_len=1024, precision="mixed_bf16")
    # 2^22 / 65536 = 64 tokens, raised to the 128-token minimum; bf16 logits + their fp32 copy (the gradient reuses
    # the bf16 buffer), a bf16 scratch for the head's weight gradient; the bf16 hidden-state and fp32 head gradients
    expected = 128 * 65_536 * (2 + 4) + 65_536 * 128 * 2 + 4096 * 128 * 2 + 65_536 * 128 * 4
    assert activation_bytes(model, layout)["logits"] == expected
    assert expected < 4096 * 65_536 * 2  # less than the bf16 logits of the whole micro-batch alone


def test_b300_fits_on_256_h100_with_expert_parallel_and_zero3() -> None:
    run = get_preset("b300")
    layout = Layout(zero_stage=3, gpus=256, expert_parallel_size=8, micro_batch_size=1, seq_len=4096,
                    recompute="full")  # fmt: skip
    estimate = estimate_memory(run.model, layout)
    # 295B params x 16 bytes / 256 ranks = 18.5 GB of sharded states before activations
    assert 17e9 < estimate.model_states < 25e9
    assert estimate.gpu_total < 80 * 1024**3


def test_fp32_zero2_keeps_local_gradients_as_measured() -> None:
    """Same-dtype gradients (fp32 on CPU): DeepSpeed hands the optimizer a view of the partition, no copy."""
    z2 = dense_layout(2, 2, precision="fp32")
    states = model_state_bytes(DENSE, z2)
    assert states["gradients"] == 4 * P  # the whole local flat gradient buffer
    assert states["optimizer"] == (4 + 8) * P / 2  # master + Adam, sharded; no separate fp32 gradient copy
    one = model_state_bytes(DENSE, dense_layout(2, 1, precision="fp32"))
    assert sum(one.values()) == 24 * P  # one rank: the flattened gradient is a copy (measured 24.2 bytes/param)


def test_checkpoint_tag_size_and_the_disk_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """b300: 295B parameters x (2 bf16 module + 4 fp32 master + 8 Adam + 2 bf16 consolidated) = 4.4 TiB per tag."""
    from lumina_ds.cli.train import warn_if_checkpoints_outgrow_disk
    from lumina_ds.config.presets import get_preset
    from lumina_ds.planning.memory import checkpoint_tag_bytes

    inv = ParamInventory.of(get_preset("b300").model)
    assert checkpoint_tag_bytes(inv, precision="mixed_bf16", zero_stage=3) == inv.total * 16
    assert checkpoint_tag_bytes(inv, precision="fp32", zero_stage=0) == inv.total * (4 + 4 + 8)  # Adam in place
    run = get_preset("debug")
    run.logging.output_dir = str(tmp_path)
    warn_if_checkpoints_outgrow_disk(run)
    assert capsys.readouterr().err == ""  # a 0.5M model fits anywhere
    monkeypatch.setattr("shutil.disk_usage", lambda path: type("Usage", (), {"free": 10_000_000})())
    warn_if_checkpoints_outgrow_disk(run)  # debug: 509,568 x 20 bytes (fp32, ZeRO 1) x 5 tags = 51 MB > 10 MB
    err = capsys.readouterr().err
    assert "warning: each checkpoint takes about 9.7 MB and --save-total-limit 5 keeps 48.6 MB" in err
    assert "9.5 MB free" in err


def test_router_logits_and_softmax_stay_for_the_step_under_recompute() -> None:
    """The router losses keep every MoE layer's fp32 logits and softmax from its forward to the end of the step, even
    when the FFN's own tensors are recomputed (about 2.4 GB at b300 before they were counted)."""
    from lumina_ds.planning.memory import estimate_memory
    from lumina_ds.planning.memory_inputs import Layout, with_bucket_rules

    run = get_preset("b300")
    moe_layers = sum(run.model.moe.is_moe_layer(i) for i in range(run.model.num_layers))
    base = with_bucket_rules(Layout(zero_stage=3, gpus=256, expert_parallel_size=8, micro_batch_size=8), run.model)
    for recompute in ("full", "moe"):
        router = estimate_memory(run.model, replace(base, recompute=recompute)).gpu["router"]
        assert router == 8 * 4096 * moe_layers * run.model.moe.num_experts * 4 * 2
    assert estimate_memory(run.model, replace(base, recompute="none")).gpu["router"] == 0  # in the FFN's tensors
