"""The memory model's terms from the issue "Plan for the cluster you are on": ZeRO-3's reuse window, dropless
expert parallelism's rank load, and what a process holds outside torch's allocator (CUDA context, NCCL)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lumina_ds.config.presets import get_preset
from lumina_ds.models.moe import DROPLESS_IMBALANCE
from lumina_ds.planning.activations import activation_bytes, routed_load
from lumina_ds.planning.memory import nccl_communicators, runtime_bytes, zero3_live_elements
from lumina_ds.planning.memory_inputs import (
    CPU_PROCESS_BYTES,
    CUDA_CONTEXT_BYTES,
    GIB,
    NCCL_COMMUNICATOR_BYTES,
    Layout,
    ParamInventory,
)

# three modules in forward order, each owning one parameter (id, numel, expert); the head's weight is tied to the
# embedding's (id 0), as the presets' tied embeddings are
TRACE = (((0, 1000, False),), ((1, 300, False),), ((2, 800, True),), ((0, 1000, False),))
INV = ParamInventory(dense_sizes=(1000, 300), expert_sizes=(800,), largest_dense_module=1000,
                     largest_expert_module=800, trace=TRACE)  # fmt: skip


def z3(**kw: object) -> Layout:
    base = dict(zero_stage=3, gpus=2, persistence_threshold=0)
    base.update(kw)
    return Layout(**base)  # type: ignore[arg-type]


def test_zero3_keeps_what_is_reused_within_the_distance_gathered_at_the_turn_to_backward() -> None:
    # DeepSpeed's trace: forward, then backward in reverse; a module after which `after` elements run in forward is
    # used again 2 x after elements later. The head (after 0) is always held; the tied embedding is the same weight.
    assert zero3_live_elements(INV, z3(max_reuse_distance=1)) == 1000  # the head's (tied) weight, the largest module
    # distance 1700: the experts are used again 2 x 1000 = 2000 >= 1700 elements later, so released; the head is held
    assert zero3_live_elements(INV, z3(max_reuse_distance=1700)) == 1000
    # distance 2001: the experts (2 x 1000 < 2001) are held with the head; the 300 (2 x 1800) are not
    assert zero3_live_elements(INV, z3(max_reuse_distance=2001)) == 1000 + 800
    # DeepSpeed's default 1e9: the whole model, each weight once
    assert zero3_live_elements(INV, z3()) == 1000 + 300 + 800
    # expert parallelism: a rank holds 1/ep of the experts; persistent parameters are counted apart
    assert zero3_live_elements(INV, z3(expert_parallel_size=2)) == 1000 + 300 + 400
    assert zero3_live_elements(INV, z3(persistence_threshold=500)) == 1000 + 800


def test_zero3_working_set_of_a_small_model_is_all_of_it_at_the_default_distance() -> None:
    """The cause of the 29-36% ZeRO-3 underestimate of benchmarks/NOTES.md: below 5e8 elements every parameter
    stays gathered from its forward into backward, not one module at a time."""
    model = get_preset("m120_speed").model
    inv = ParamInventory.of(model)
    layout = z3(gpus=8)
    persistent = sum(n for n in inv.dense_sizes if n <= layout.persistence_threshold)
    assert zero3_live_elements(inv, layout) == inv.total - persistent
    assert zero3_live_elements(inv, replace(layout, max_reuse_distance=1)) < inv.total / 4


def test_routed_activations_count_the_rank_load_only_across_ranks() -> None:
    run = get_preset("debug")  # 4 experts, top-2
    model = run.model
    one = Layout(zero_stage=2, gpus=2, micro_batch_size=8, seq_len=256)
    # EP 1: every copy is local, top_k per token exactly, whatever the capacity factor
    assert routed_load(model, one) == 1.0
    assert activation_bytes(replace(model, moe=replace(model.moe, capacity_factor=4.0)), one) == activation_bytes(
        model, one
    )
    two = replace(one, expert_parallel_size=2)
    assert routed_load(model, two) == DROPLESS_IMBALANCE == 2.0  # the bound here: 2 x min(2, 4 / 2) / 2 = 2
    four = replace(one, gpus=4, expert_parallel_size=4)
    assert routed_load(model, four) == 2.0  # min(2.0, 4 x min(2, 1) / 2 = 2)
    top1 = replace(model, moe=replace(model.moe, top_k=1))
    assert routed_load(top1, replace(one, expert_parallel_size=2)) == 2.0
    assert routed_load(model, replace(two, routed_load=1.3)) == 1.3  # a measured load
    # the all-to-all buffers: the sent copies (exactly top_k per token) and the received (at the load)
    h, tokens = model.hidden_size, 8 * 256
    assert activation_bytes(model, two)["moe_dispatch"] == (1 + 2.0) * 2 * tokens * h * 2


def test_runtime_counts_the_context_and_each_nccl_communicator_a_rank_uses() -> None:
    assert nccl_communicators(Layout(zero_stage=3, gpus=1)) == 0
    assert nccl_communicators(Layout(zero_stage=3, gpus=8)) == 1  # the data-parallel group
    assert nccl_communicators(Layout(zero_stage=3, gpus=8, expert_parallel_size=8)) == 3  # + EP all-to-all (x2)
    assert nccl_communicators(Layout(zero_stage=3, gpus=16, expert_parallel_size=8)) == 4  # + expert data-parallel
    assert runtime_bytes(Layout(zero_stage=3, gpus=16, expert_parallel_size=8)) == pytest.approx(
        CUDA_CONTEXT_BYTES + 4 * NCCL_COMMUNICATOR_BYTES
    )
    assert runtime_bytes(Layout(zero_stage=3, gpus=8, device="cpu")) == CPU_PROCESS_BYTES
    assert runtime_bytes(Layout(zero_stage=3, gpus=1)) < 1 * GIB
