"""MoE math: router top-k, load-balancing and z losses against hand computations, grouped experts vs a naive loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lumina_ds.models.config import ModelConfig, MoEConfig
from lumina_ds.models.moe import (
    GroupedExperts,
    MoEBlock,
    expert_counts,
    load_balancing_loss,
    route_top_k,
    router_z_loss,
    tokens_per_expert,
)
from lumina_ds.models.transformer import Transformer

LOGITS = [
    [2.0, 1.0, 0.0, -1.0],
    [0.5, 3.0, 0.2, 0.1],
    [-1.0, 0.0, 2.5, 1.5],
    [1.0, 0.9, 0.8, 3.0],
    [0.3, 2.2, -0.5, 2.0],
]


def softmax_row(row: list[float]) -> list[float]:
    m = max(row)
    exps = [math.exp(v - m) for v in row]
    return [e / sum(exps) for e in exps]


def top_k_of(row: list[float], k: int) -> list[int]:
    return sorted(range(len(row)), key=lambda i: -row[i])[:k]


def hand_load_balancing(logits: list[list[float]], k: int) -> float:
    T, E = len(logits), len(logits[0])
    probs = [softmax_row(r) for r in logits]
    counts = [0] * E
    for p in probs:
        for e in top_k_of(p, k):
            counts[e] += 1
    fractions = [c / (T * k) for c in counts]
    mean_probs = [sum(p[e] for p in probs) / T for e in range(E)]
    return E * sum(f * p for f, p in zip(fractions, mean_probs, strict=True))


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """One expert on one token: w2 (silu(w1 x) * w3 x), weights as [out, in]."""
    return w2 @ (F.silu(w1 @ x) * (w3 @ x))


def naive_experts(
    experts: GroupedExperts, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            out[t] += weights[t, j] * swiglu(x[t], experts.w1[e], experts.w2[e], experts.w3[e])
    return out


def make_experts(num_experts: int = 4, hidden: int = 8, ffn: int = 16, seed: int = 0) -> GroupedExperts:
    torch.manual_seed(seed)
    experts = GroupedExperts(num_experts=num_experts, hidden_size=hidden, intermediate_size=ffn)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return experts


@pytest.mark.parametrize("k", [1, 2, 3])
def test_load_balancing_loss_equals_hand_computation(k: int) -> None:
    got = float(load_balancing_loss(torch.tensor(LOGITS), k))
    assert got == pytest.approx(hand_load_balancing(LOGITS, k), abs=1e-6)


def test_load_balancing_loss_hand_value_top1() -> None:
    # two tokens, two experts: probs (0.731, 0.269) and (0.269, 0.731); each expert wins once
    # -> f = (1/2, 1/2), P = (1/2, 1/2) -> 2 * (1/4 + 1/4) = 1
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(load_balancing_loss(logits, 1)) == pytest.approx(1.0, abs=1e-6)
    # both tokens to expert 0: f = (1, 0), P0 = sigmoid(1) = 0.7311 -> 2 * 0.7311
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    expected = 2 * (1 / (1 + math.exp(-1.0)))
    assert float(load_balancing_loss(logits, 1)) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_load_balancing_loss_is_one_for_uniform_assignment(k: int) -> None:
    # token i prefers experts i, i+1, ... (mod E) by the same margins: a cyclic construction, so every expert
    # receives the same number of assignments and the mean router probability of every expert is 1/E
    E = 4
    base = [4.0, 2.0, 0.0, -1.0]
    logits = torch.tensor([[base[(e - i) % E] for e in range(E)] for i in range(E)])
    assert float(load_balancing_loss(logits, k)) == pytest.approx(1.0, abs=1e-6)


def test_load_balancing_loss_grows_when_routing_collapses() -> None:
    E = 4
    logits = torch.tensor([[30.0, 0.0, 0.0, 0.0]] * 6)  # every token sends everything to expert 0
    assert float(load_balancing_loss(logits, 1)) == pytest.approx(E, abs=1e-4)


def test_router_z_loss_equals_hand_computation() -> None:
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in LOGITS) / len(LOGITS)
    assert float(router_z_loss(torch.tensor(LOGITS))) == pytest.approx(expected, abs=1e-5)
    # zero logits over E experts: log-partition is log(E)
    assert float(router_z_loss(torch.zeros(3, 8))) == pytest.approx(math.log(8) ** 2, abs=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_route_top_k_picks_largest_and_renormalises(k: int) -> None:
    torch.manual_seed(0)
    logits = torch.randn(10, 6)
    weights, indices = route_top_k(logits, k)
    assert weights.shape == indices.shape == (10, k)
    torch.testing.assert_close(weights.sum(-1), torch.ones(10), rtol=0, atol=1e-6)
    for t, row in enumerate(logits.tolist()):
        chosen = top_k_of(row, k)
        assert indices[t].tolist() == chosen
        probs = softmax_row(row)
        denom = sum(probs[e] for e in chosen)
        assert weights[t].tolist() == pytest.approx([probs[e] / denom for e in chosen], abs=1e-6)


def test_expert_counts_equals_hand_count() -> None:
    counts = expert_counts(torch.tensor(LOGITS), 2)
    hand = [0] * 4
    for row in LOGITS:
        for e in top_k_of(row, 2):
            hand[e] += 1
    assert counts.tolist() == hand
    assert int(counts.sum()) == len(LOGITS) * 2


@pytest.mark.parametrize("k", [1, 2])
def test_grouped_experts_equal_naive_loop(k: int) -> None:
    experts = make_experts()
    torch.manual_seed(1)
    x = torch.randn(9, 8)
    weights, indices = route_top_k(torch.randn(9, 4), k)
    with torch.no_grad():
        torch.testing.assert_close(experts(x, weights, indices), naive_experts(experts, x, weights, indices))


def test_grouped_experts_with_an_unused_expert() -> None:
    experts = make_experts()
    torch.manual_seed(2)
    x = torch.randn(5, 8)
    indices = torch.tensor([[0, 2], [2, 0], [1, 0], [2, 1], [0, 1]])  # expert 3 receives nothing
    weights = torch.softmax(torch.randn(5, 2), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(experts(x, weights, indices), naive_experts(experts, x, weights, indices))


def test_moe_block_equals_naive_routing_plus_shared_expert() -> None:
    torch.manual_seed(0)
    block = MoEBlock(hidden_size=8, num_experts=4, top_k=2, intermediate_size=16, shared_intermediate_size=12)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        out = block(x)
        flat = x.reshape(10, 8)
        probs = (flat @ block.gate.weight.T).softmax(-1)
        routed = torch.zeros_like(flat)
        for t in range(10):
            top = top_k_of(probs[t].tolist(), 2)
            denom = sum(float(probs[t, e]) for e in top)
            for e in top:
                w1, w2, w3 = block.experts.w1[e], block.experts.w2[e], block.experts.w3[e]
                routed[t] += float(probs[t, e]) / denom * swiglu(flat[t], w1, w2, w3)
        assert block.shared is not None
        shared = torch.stack(
            [swiglu(v, block.shared.w1.weight, block.shared.w2.weight, block.shared.w3.weight) for v in flat]
        )
        assert shared.abs().max() > 1e-2  # the shared expert contributes something measurable
    torch.testing.assert_close(out.reshape(10, 8), routed + shared)


def tiny_moe_model(**moe: object) -> Transformer:
    torch.manual_seed(0)
    fields: dict[str, object] = dict(num_experts=4, top_k=2, expert_intermediate_size=32)
    fields.update(moe)
    config = ModelConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
        max_seq_len=64, init_std=0.1, moe=MoEConfig(**fields),  # type: ignore[arg-type]
    )  # fmt: skip
    return Transformer(config)


def test_model_expert_counts_sum_to_tokens_times_k() -> None:
    model = tiny_moe_model()
    ids = torch.randint(0, 64, (3, 7))
    out = model(ids, labels=ids)
    counts = out["metrics"]["expert_counts"]
    assert counts.shape == (2, 4)
    assert counts.sum(dim=1).tolist() == [3 * 7 * 2, 3 * 7 * 2]


@pytest.mark.parametrize("loss_name", ["aux_loss", "z_loss"])
def test_router_losses_send_gradients_to_every_gate(loss_name: str) -> None:
    model = tiny_moe_model()
    ids = torch.randint(0, 64, (2, 8))
    model(ids, labels=ids)["metrics"][loss_name].backward()
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    assert len(blocks) == 2
    for block in blocks:
        grad = block.gate.weight.grad
        assert grad is not None and grad.abs().sum() > 0
    # nothing after the last router feeds the router losses
    assert blocks[-1].experts.w1.grad is None
    assert model.norm.weight.grad is None


def test_lm_loss_sends_gradients_to_gate_through_routing_weights() -> None:
    model = tiny_moe_model()
    ids = torch.randint(0, 64, (2, 8))
    model(ids, labels=ids)["lm_loss"].backward()
    for block in [m for m in model.modules() if isinstance(m, MoEBlock)]:
        grad = block.gate.weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_grouped_gemm_and_per_expert_loop_agree_in_values_and_gradients() -> None:
    """The CPU path (one grouped GEMM per weight) and the fallback loop compute the same experts."""
    torch.manual_seed(0)
    experts = GroupedExperts(num_experts=4, hidden_size=16, intermediate_size=8)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    xs = torch.randn(30, 16)
    counts = torch.tensor([9, 0, 14, 7])  # includes an expert that receives nothing
    grads = []
    for path in (experts._grouped, experts._looped):
        experts.zero_grad()
        out = path(xs, counts)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in experts.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads[0][1][0][1].abs().sum() == 0  # the idle expert gets no gradient


def test_grouped_gemm_follows_autocast_dtype() -> None:
    experts = GroupedExperts(num_experts=2, hidden_size=16, intermediate_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts._grouped(torch.randn(5, 16), torch.tensor([2, 3]))
    assert out.dtype == torch.bfloat16


def test_tokens_per_expert_counts_like_bincount_and_keeps_unused_experts() -> None:
    indices = torch.tensor([[0, 3], [3, 1], [0, 3]])  # expert 2 gets nothing, expert 5 does not exist here
    assert tokens_per_expert(indices, 6).tolist() == [2, 1, 0, 3, 0, 0]
    random = torch.randint(0, 8, (100, 2))
    assert torch.equal(tokens_per_expert(random, 8), torch.bincount(random.flatten(), minlength=8))


def test_expert_widths_grouped_mm_cannot_take_run_per_expert() -> None:
    """torch._grouped_mm needs rows of a multiple of 16 bytes; an imported model's expert size (18 x fp32) may not."""
    from lumina_ds.models.moe import use_grouped_mm

    x = torch.randn(9, 8)
    assert use_grouped_mm(x, widths=(8, 16)) and not use_grouped_mm(x, widths=(8, 18))
    assert use_grouped_mm(x.bfloat16(), widths=(8, 24)) and not use_grouped_mm(x.bfloat16(), widths=(8, 20))
    torch.manual_seed(3)
    experts = GroupedExperts(num_experts=4, hidden_size=8, intermediate_size=18)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    weights, indices = route_top_k(torch.randn(9, 4), 2)
    with torch.no_grad():
        torch.testing.assert_close(experts(x, weights, indices), naive_experts(experts, x, weights, indices))


def test_cpu_bf16_groups_are_padded_to_row_multiples_with_zero_weight_rows() -> None:
    """Each expert's rows are rounded up to GROUP_ROW_MULTIPLE (oneDNN then reuses a few matmul shapes); every real
    assignment keeps its token and weight, and the padding rows weigh 0."""
    from lumina_ds.models.moe import pad_groups

    counts = torch.tensor([3, 0, 32, 33, 1])  # an idle expert, an exact multiple, one past it
    sorted_experts = torch.repeat_interleave(torch.arange(5), counts)  # [69]
    token_of = torch.randperm(69) + 1  # token 0 never appears: padding rows are told apart by their weight
    route_weights = torch.rand(69, 1) + 0.5
    tokens, weights, padded = pad_groups(sorted_experts, token_of, route_weights, counts, 32)
    assert padded.tolist() == [32, 0, 32, 64, 32]
    assert tokens.shape == (160,) and weights.shape == (160, 1)
    real = weights[:, 0] > 0
    assert int(real.sum()) == 69 and torch.equal(tokens[real], token_of)
    assert torch.equal(weights[real], route_weights) and bool((tokens[~real] == 0).all())
    starts = [0, 32, 32, 64, 128]  # each expert's assignments start its padded group, in their sorted order
    for expert, start in enumerate(starts):
        n = int(counts[expert])
        assert bool(real[start : start + n].all()) and not bool(real[start + n : start + int(padded[expert])].any())


def test_padded_bf16_experts_equal_unpadded_bitwise_in_values_and_gradients(monkeypatch) -> None:
    from lumina_ds.models import moe

    torch.manual_seed(5)
    experts = GroupedExperts(num_experts=7, hidden_size=24, intermediate_size=40)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(401, 24)  # 1203 assignments: over the 4 x 32 x 7 below which nothing is padded
    logits = torch.randn(401, 7)
    group_ends: list[list[int]] = []
    grouped_mm = torch._grouped_mm

    def recording_grouped_mm(a: torch.Tensor, b: torch.Tensor, *, offs: torch.Tensor) -> torch.Tensor:
        group_ends.append(offs.tolist())
        return grouped_mm(a, b, offs=offs)

    monkeypatch.setattr(torch, "_grouped_mm", recording_grouped_mm)
    results = []
    for multiple in (1, 32):
        monkeypatch.setattr(moe, "GROUP_ROW_MULTIPLE", multiple)
        experts.zero_grad()
        xg, lg = x.clone().requires_grad_(), logits.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = experts(xg, *route_top_k(lg, 3))
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach(), xg.grad, lg.grad] + [p.grad for p in experts.parameters()])
    for unpadded, padded in zip(*results, strict=True):
        assert torch.equal(unpadded, padded)
    assert group_ends[0][-1] == 401 * 3 and any(end % 32 for end in group_ends[0])  # exact counts at multiple 1
    assert all(end % 32 == 0 for end in group_ends[-1]) and group_ends[-1][-1] > 401 * 3


def test_small_batches_are_not_padded() -> None:
    """Decoding routes a few tokens: padding each expert to 32 rows would multiply its work for no shape reuse."""
    from lumina_ds.models.moe import group_row_multiple

    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert group_row_multiple(x, assignments=16, num_experts=8) == 1  # decoding 8 rows, top-2
        assert group_row_multiple(x, assignments=1024, num_experts=8) == 32  # 4 x 32 per expert: padded
        assert group_row_multiple(x, assignments=1023, num_experts=8) == 1
    assert group_row_multiple(x, assignments=4096, num_experts=8) == 1  # fp32: MKL has no per-shape primitives
