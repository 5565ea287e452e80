"""Planner: picks a fitting layout for b300 on 32x8x80 GB, refuses it on one node; where each layout rule lives."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from lumina_ds.config.presets import get_preset
from lumina_ds.distributed.preflight import preflight
from lumina_ds.errors import ConfigError, MemoryPlanError
from lumina_ds.planning.layouts import zero_section
from lumina_ds.planning.memory import estimate_memory
from lumina_ds.planning.memory_inputs import GIB, Layout, ParamInventory
from lumina_ds.planning.plan_report import format_plan, plan_as_dict
from lumina_ds.planning.planner import (
    HOST_SYNC_SECONDS,
    INTER_NODE_BW,
    INTRA_NODE_BW,
    RECOMPUTE_FACTOR,
    Cluster,
    expert_parallel_sizes,
    host_syncs,
    hpz_choices,
    plan,
    step_seconds,
    zero_comm_seconds,
)


def test_b300_on_32_nodes_fits_with_zero3_and_expert_parallel() -> None:
    cluster = Cluster(nodes=32, gpus_per_node=8, gpu_mem_gib=80)
    result = plan(get_preset("b300"), cluster)
    best = result.best
    assert best.rejection is None and best.estimate.gpu_total <= 80 * GIB
    assert best.layout.zero_stage == 3  # 295B params x 2 bytes do not fit replicated on 80 GB
    ep = best.layout.expert_parallel_size
    assert ep > 1 and 144 % ep == 0 and 256 % ep == 0
    assert best.layout.micro_batch_size * best.grad_accum == 64  # the preset's rows per GPU per step
    # nothing faster fits: every candidate that fits has a step time >= the chosen one
    assert all(c.step_seconds >= best.step_seconds for c in result.candidates if c.rejection is None)
    text = format_plan(result)
    assert "chosen" in text and "rejected: GPU" in text  # ZeRO-0/1 are shown with why they lost
    assert json.loads(json.dumps(plan_as_dict(result)))["chosen"]["zero_stage"] == 3
    # a save: 295B x (2 bf16 module + 4 fp32 master + 8 Adam) bytes, every node writing 2 GB/s; the consolidated
    # weights (2 bytes each) only in the last tag, by rank 0 alone; the signal lead covers a step, a save and 30 s
    params = ParamInventory.of(get_preset("b300").model).total
    assert result.checkpoint_bytes == params * 14 and result.weights_bytes == params * 2
    assert result.save_seconds == pytest.approx(params * 14 / (32 * 2e9))
    assert result.signal_lead_seconds == math.ceil(best.step_seconds + result.save_seconds + 30)
    assert f"#SBATCH --signal=USR1@{result.signal_lead_seconds}" in text
    slower = plan(get_preset("b300"), replace(cluster, fs_write_gbps=0.5))
    assert slower.save_seconds == pytest.approx(4 * result.save_seconds)


def test_b300_on_one_node_is_refused_with_what_would_fit() -> None:
    with pytest.raises(MemoryPlanError) as exc:
        plan(get_preset("b300"), Cluster(nodes=1, gpus_per_node=8, gpu_mem_gib=80, cpu_mem_gib=1024))
    # only full offload fits the GPUs, and then ~18 bytes x 295B / node of host memory are needed
    assert exc.value.code == "E202"
    assert "--nodes" in exc.value.hint
    with pytest.raises(MemoryPlanError) as exc:
        plan(get_preset("b300"), Cluster(nodes=1, gpus_per_node=8, gpu_mem_gib=16))
    assert exc.value.code == "E201"  # even fully offloaded, one layer's experts + logits exceed 16 GB


def test_small_presets_fit_one_node_without_recompute() -> None:
    result = plan(get_preset("b1"), Cluster(nodes=1, gpus_per_node=8, gpu_mem_gib=80))
    assert not result.best.layout.gradient_checkpointing  # recompute costs a third more compute: not needed
    assert result.best.offload == "none"


def test_expert_parallel_sizes_divide_experts_and_gpus() -> None:
    b300 = get_preset("b300").model  # 144 experts
    assert expert_parallel_sizes(b300, 256) == [1, 2, 4, 8, 16]
    assert expert_parallel_sizes(b300, 24) == [1, 2, 3, 4, 6, 8, 12, 24]
    b300.moe.num_experts = 0
    assert expert_parallel_sizes(b300, 256) == [1]


def test_cost_model_recompute_and_zero3_traffic() -> None:
    run = get_preset("b7")
    inv = ParamInventory.of(run.model)
    cluster = Cluster(nodes=1, gpus_per_node=8, gpu_mem_gib=80)
    base = Layout(zero_stage=2, gpus=8, seq_len=4096, micro_batch_size=2)
    fast = step_seconds(run.model, inv, base, grad_accum=4, cluster=cluster, flops=1e9, mfu=0.4)
    slow = step_seconds(run.model, inv, replace(base, recompute="full"), grad_accum=4, cluster=cluster,
                        flops=1e9, mfu=0.4)  # fmt: skip
    compute = 1e9 * 2 * 4 * 4096 / (989e12 * 0.4)
    assert slow - fast == pytest.approx(compute * (RECOMPUTE_FACTOR - 1))
    # ZeRO-3 gathers params twice and reduces grads every micro-step; ZeRO-2 gathers once per step
    z2, z3 = zero_comm_seconds(inv, base, 4, cluster), zero_comm_seconds(inv, replace(base, zero_stage=3), 4, cluster)
    assert z2 == pytest.approx((4 * inv.total * 2 + inv.total * 2) / INTRA_NODE_BW)
    assert z3 == pytest.approx(4 * inv.total * (2 * 2 + 2) / INTRA_NODE_BW)


def test_hpz_moves_the_backward_gathers_into_the_node_and_costs_a_secondary_copy() -> None:
    """ZeRO++ hpZ on 4 nodes: the forward gather and the gradient reduction still cross nodes, the backward gather
    and the recompute's read the node's copy over NVLink; each GPU holds 1/8 of the parameters more."""
    run = get_preset("b7")
    inv = ParamInventory.of(run.model)
    cluster = Cluster(nodes=4, gpus_per_node=8, gpu_mem_gib=80)
    z3 = Layout(zero_stage=3, gpus=32, seq_len=4096, micro_batch_size=2, recompute="full")
    hpz = replace(z3, hpz_partition_size=8)
    per_pass = 4 * inv.total * 2  # 4 micro-steps of 16-bit parameters
    assert zero_comm_seconds(inv, z3, 4, cluster) == pytest.approx(4 * per_pass / INTER_NODE_BW)
    assert zero_comm_seconds(inv, hpz, 4, cluster) == pytest.approx(2 * per_pass / INTER_NODE_BW
                                                                     + 2 * per_pass / INTRA_NODE_BW)  # fmt: skip
    extra = (
        estimate_memory(run.model, hpz, inv).gpu["parameters"] - estimate_memory(run.model, z3, inv).gpu["parameters"]
    )
    assert extra == pytest.approx(inv.total * 2 / 8)
    assert zero_section(hpz)["zero_hpz_partition_size"] == 8 and "zero_hpz_partition_size" not in zero_section(z3)
    # offered at ZeRO-3 across nodes with EP 1 only: DeepSpeed 0.19.8 refuses it with AutoEP
    assert hpz_choices(stage=3, ep=1, offload="none", cluster=cluster) == [1, 8]
    assert hpz_choices(stage=3, ep=2, offload="none", cluster=cluster) == [1]
    assert hpz_choices(stage=3, ep=1, offload="none", cluster=replace(cluster, nodes=1)) == [1]


def test_autoep_host_syncs_cost_a_drain_per_moe_layer_and_pass_unless_the_split_plan_is_async() -> None:
    run = get_preset("b100")
    inv = ParamInventory.of(run.model)
    cluster = Cluster(nodes=16, gpus_per_node=8, gpu_mem_gib=80)
    layout = Layout(zero_stage=3, gpus=128, expert_parallel_size=8, seq_len=4096, recompute="full")
    moe_layers = sum(run.model.moe.is_moe_layer(i) for i in range(run.model.num_layers))
    assert host_syncs(run.model, layout, 4, async_split_plan=False) == 4 * 3 * moe_layers
    assert host_syncs(run.model, layout, 4, async_split_plan=True) == 0
    assert host_syncs(run.model, replace(layout, expert_parallel_size=1), 4, async_split_plan=False) == 0
    args = dict(grad_accum=4, cluster=cluster, flops=1e9, mfu=0.4)
    before = step_seconds(run.model, inv, layout, async_split_plan=False, **args)  # type: ignore[arg-type]
    after = step_seconds(run.model, inv, layout, **args)  # type: ignore[arg-type]
    assert before - after == pytest.approx(4 * 3 * moe_layers * HOST_SYNC_SECONDS)


def _run(**dist: object):  # type: ignore[no-untyped-def]
    run = get_preset("debug")  # 4 experts
    for key, value in dist.items():
        setattr(run.distributed, key, value)
    return run


def test_preflight_is_the_world_size_rule() -> None:
    """GPUs = DP x EP depends on the launch: the pre-flight's E203, the one rule left there."""
    with pytest.raises(MemoryPlanError) as exc:
        preflight(_run(expert_parallel_size=2), 3)
    assert exc.value.code == "E203"
    assert "DP x EP" in str(exc.value)
    preflight(_run(expert_parallel_size=2), 4)


@pytest.mark.parametrize(
    ("dist", "words"),
    [
        ({"expert_parallel_size": 3}, "not divisible"),
        ({"moe_backend": "native", "zero_stage": 3}, "autoep"),
        ({"deepspeed": {"checkpoint": {"load_universal": True}}, "moe_backend": "native"}, "universal"),
    ],
)
def test_layout_rules_on_the_config_alone_are_validate_e002(dist: dict[str, object], words: str) -> None:
    run = _run(**dist)
    with pytest.raises(ConfigError) as exc:
        run.validate()
    assert exc.value.code == "E002"
    assert words in str(exc.value)


def test_precision_and_universal_rules(tmp_path: Path) -> None:
    run = _run(zero_stage=0)
    run.train.precision = "bf16"
    with pytest.raises(ConfigError, match="ZeRO stage 1, 2 or 3"):
        run.validate()
    _run(deepspeed={"checkpoint": {"load_universal": True}}).validate()  # AutoEP experts load from universal ckpts


def test_the_plan_keeps_its_headroom_free_and_zero_headroom_takes_the_old_choice() -> None:
    """b300 on 32x8 H100 chose 78.3 of 79.1 GiB with no headroom: nothing left for what the model does not count."""
    kept = plan(get_preset("b300"), Cluster(32, 8, 79.1))
    assert kept.best.estimate.gpu_total <= 0.9 * 79.1 * GIB
    assert all(c.rejection is not None for c in kept.candidates if c.estimate.gpu_total > 0.9 * 79.1 * GIB)
    full = plan(get_preset("b300"), Cluster(32, 8, 79.1, headroom=0.0))
    assert 0.9 * 79.1 * GIB < full.best.estimate.gpu_total <= 79.1 * GIB  # what the plan chose before headroom
    assert full.best.step_seconds < kept.best.step_seconds  # the headroom costs some speed


def test_memory_headroom_must_be_a_fraction(capsys: pytest.CaptureFixture[str]) -> None:
    from lumina_ds.cli import main

    assert main(["plan", "--preset", "debug", "--nodes", "1", "--memory-headroom", "1.5"]) == 1
    assert "[E002] --memory-headroom 1.5 is not a fraction" in capsys.readouterr().err


def test_b100_fits_one_8_gpu_node_with_its_optimizer_states_on_nvme() -> None:
    """ZeRO-Infinity: the host cannot hold b100's offloaded states (E202), 30 TB of NVMe per node can."""
    from lumina_ds.planning.layouts import ds_config_for_plan

    node = Cluster(1, 8, 79.1, 1024.0)
    with pytest.raises(MemoryPlanError) as err:
        plan(get_preset("b100"), node)
    assert err.value.code == "E202"
    result = plan(get_preset("b100"), replace(node, nvme_gib=30000.0))
    best = result.best
    assert best.layout.offload_device == "nvme" and best.layout.zero_stage == 3
    assert best.layout.expert_parallel_size == 1  # DeepSpeed cannot checkpoint AutoEP experts spread with NVMe
    assert best.estimate.gpu_total <= 0.9 * 79.1 * GIB and best.estimate.host_total <= 0.9 * 1024 * GIB
    shard = ParamInventory.of(get_preset("b100").model).total / 8
    per_node = 8 * shard * (4 + 4 + 8 + (2 if best.offload == "optimizer+params" else 0))  # master, grad, moments
    assert best.estimate.nvme == pytest.approx(per_node) and best.estimate.nvme <= 0.9 * 30000 * GIB
    assert best.step_seconds > 0 and "NVMe:" in format_plan(result)
    zero = ds_config_for_plan(get_preset("b100"), result)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "nvme" and zero["offload_optimizer"]["nvme_path"] == "/local_nvme"


def test_nvme_is_considered_only_where_a_node_has_nvme_space() -> None:
    result = plan(get_preset("b14"), Cluster(1, 8, 79.1, 1024.0))
    assert all(c.layout.offload_device == "cpu" for c in result.candidates)
    slow_disks = plan(get_preset("b14"), Cluster(1, 8, 79.1, 1024.0, nvme_gib=30000.0, nvme_gbps=0.001))
    assert slow_disks.best.layout.offload_device == "cpu"  # a layout that fits without NVMe is faster than 1 MB/s
