"""Router health per MoE layer: routing entropy, idle experts, routes the native layer's capacity drops, and the
expert-load histograms TensorBoard gets."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lumina_ds.distributed.expert_parallel import NativeMoEBlock, apply_native_moe
from lumina_ds.models.config import ModelConfig, MoEConfig
from lumina_ds.models.moe import router_entropy
from lumina_ds.models.transformer import ModelOutput, Transformer
from lumina_ds.monitor.callbacks import MoESummary, TensorBoardLogger
from lumina_ds.training.metrics import WindowMetrics


def test_router_entropy_of_a_hand_built_distribution() -> None:
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
    sure = -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1))  # 0.9404 nats
    expected = (math.log(4) + sure) / 2
    assert float(router_entropy(probs.log() + 3.0)) == pytest.approx(expected, abs=1e-6)  # softmax ignores a shift


def test_idle_experts_and_drop_rate_from_hand_made_counts() -> None:
    record = {"expert_counts": [[5, 0, 3, 0], [2, 2, 2, 2]], "tokens_dropped": [2, 0]}
    MoESummary().on_log(record)
    assert record["idle_expert_frac"] == [0.5, 0.0]
    assert record["drop_rate"] == [2 / 8, 0.0]  # dropped routes over the layer's routes (tokens x top-k)
    assert record["experts_used"] == 2


def test_the_window_averages_per_layer_means_and_sums_counters() -> None:
    window = WindowMetrics()
    for entropy, counts in (([1.0, 2.0], [[3, 1]]), ([3.0, 6.0], [[0, 4]])):
        metrics = {"router_entropy": torch.tensor(entropy), "expert_counts": torch.tensor(counts)}
        out = ModelOutput(loss=torch.tensor(1.0), lm_loss=torch.tensor(1.0), metrics=metrics)
        window.add(out, tokens=4)
    summary = window.summary()
    assert summary["router_entropy"] == [2.0, 4.0]
    assert summary["expert_counts"] == [[3, 5]]
    assert summary["loss"] == 1.0


def test_native_drops_are_the_routes_deepspeeds_gate_evicted() -> None:
    """Capacity ceil(32 tokens / 4 experts x 0.5 x 2) = 8 per expert for 64 routes: some experts overflow."""
    from deepspeed.moe.sharded_moe import top2gating

    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=16, capacity_factor=0.5, min_capacity=1)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, moe=moe))
    apply_native_moe(model, ep_size=1, ep_rank=0, deterministic=True)  # no random token selection: reproducible
    gate_inputs: list[torch.Tensor] = []
    for layer in model.layers:
        assert isinstance(layer.ffn, NativeMoEBlock)
        layer.ffn.moe.deepspeed_moe.gate.register_forward_pre_hook(lambda _m, args: gate_inputs.append(args[0]))
    ids = torch.randint(0, 64, (2, 16))
    metrics = model(ids, labels=ids)["metrics"]
    dropped = metrics["tokens_dropped"].tolist()
    expected = []
    for layer, x in zip(model.layers, gate_inputs, strict=True):
        logits = x.float() @ layer.ffn.gate.weight.float().T  # [32, 4]
        _, _, dispatch, exp_counts = top2gating(logits, 0.5, 1, top2_2nd_expert_sampling=False)  # dense path
        expected.append(int(exp_counts.sum()) - int(dispatch.sum()))  # routes wanted - routes given a slot
    assert dropped == expected
    overflow = [sum(max(0, c - 8) for c in layer) for layer in metrics["expert_counts"].tolist()]
    assert dropped == overflow and sum(dropped) > 0


def test_tensorboard_gets_an_expert_load_histogram_per_layer(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    record = {"step": 3, "loss": 2.0, "expert_counts": [[5, 0, 3, 0], [1, 2, 3, 4]], "router_entropy": [1.0, 1.2]}
    MoESummary().on_log(record)
    logger.on_log(record)
    logger.on_train_end({})
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0}).Reload()
    assert {"expert_load/moe_layer_0", "expert_load/moe_layer_1"} <= set(events.Tags()["histograms"])
    layer1 = events.Histograms("expert_load/moe_layer_1")[0]
    assert layer1.step == 3
    assert layer1.histogram_value.bucket == [1, 2, 3, 4]  # bucket e: tokens routed to expert e
    assert layer1.histogram_value.bucket_limit == [0.5, 1.5, 2.5, 3.5]
    assert events.Scalars("router/idle_expert_frac/moe_layer_0")[0].value == 0.5
    assert events.Scalars("router/router_entropy/moe_layer_1")[0].value == pytest.approx(1.2)
