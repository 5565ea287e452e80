"""Sampler arithmetic and KV-cached generation against a naive full-recompute reference."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from lumina_ds.errors import ConfigError
from lumina_ds.generation.sampling import SamplingConfig, filter_logits, fit_prompt, generate, sample_next
from lumina_ds.models.transformer import Transformer
from tests.generation.conftest import ScriptedModel, tiny_model_config

PROBS = [0.5, 0.3, 0.15, 0.05]


def _logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]])  # [1, V]


def _kept(filtered: torch.Tensor) -> list[int]:
    return torch.isfinite(filtered[0]).nonzero().flatten().tolist()


def _cfg(**kw: object) -> SamplingConfig:
    base: dict[str, object] = dict(temperature=1.0, top_p=1.0, top_k=0)
    base.update(kw)
    return SamplingConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kw",
    [{"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"max_new_tokens": 0},
     {"repetition_penalty": 0.0}, {"temperature": float("nan")}],
)  # fmt: skip
def test_invalid_config_raises_e002(kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as err:
        SamplingConfig(**kw)  # type: ignore[arg-type]
    assert err.value.code == "E002"


@pytest.mark.parametrize("k", [1, 3, 7])
def test_top_k_keeps_exactly_k(k: int) -> None:
    logits = torch.randn(2, 20, generator=torch.Generator().manual_seed(k))  # [2, 20]
    filtered = filter_logits(logits, _cfg(top_k=k))
    assert torch.isfinite(filtered).sum(dim=-1).tolist() == [k, k]
    top = logits.topk(k, dim=-1).indices.sort(dim=-1).values  # [2, k]
    assert torch.equal(torch.isfinite(filtered).nonzero()[:, 1].view(2, k), top)


def test_top_k_with_ties_still_keeps_exactly_k() -> None:
    filtered = filter_logits(torch.zeros(1, 10), _cfg(top_k=4))
    assert torch.isfinite(filtered).sum().item() == 4


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.3, [0]), (0.5, [0]), (0.51, [0, 1]), (0.75, [0, 1]), (0.8, [0, 1]), (0.81, [0, 1, 2]), (0.95, [0, 1, 2]),
     (0.96, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])],
)  # fmt: skip
def test_top_p_keeps_minimal_nucleus(top_p: float, kept: list[int]) -> None:
    # probs [0.5, 0.3, 0.15, 0.05]: keep a token iff the mass ranked above it is < top_p, i.e. the smallest set whose
    # mass is >= top_p. 0.5 alone reaches 0.5; {0, 1} reaches 0.8 exactly (rounding tolerated); 0.81 needs a third.
    assert _kept(filter_logits(_logits(PROBS), _cfg(top_p=top_p))) == kept


def test_top_p_is_order_independent_and_always_keeps_top_token() -> None:
    shuffled = [0.05, 0.3, 0.5, 0.15]
    assert _kept(filter_logits(_logits(shuffled), _cfg(top_p=0.8))) == [1, 2]
    assert _kept(filter_logits(_logits(shuffled), _cfg(top_p=1e-9))) == [2]


def test_top_k_then_top_p_renormalises_over_survivors() -> None:
    # after top_k=2 the survivors have probs 0.625 / 0.375, so top_p=0.6 keeps only the first
    assert _kept(filter_logits(_logits(PROBS), _cfg(top_k=2, top_p=0.6))) == [0]


def test_temperature_zero_is_greedy_argmax() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))  # [3, 50]
    cfg = SamplingConfig(temperature=0.0)
    filtered = filter_logits(logits, cfg)
    assert torch.isfinite(filtered).sum(dim=-1).tolist() == [1, 1, 1]
    assert torch.equal(sample_next(logits, cfg), logits.argmax(dim=-1))


def test_temperature_scales_logits() -> None:
    logits = torch.tensor([[2.0, 1.0, -1.0]])
    assert torch.allclose(filter_logits(logits, _cfg(temperature=0.5)), logits * 2)


def test_repetition_penalty_lowers_seen_tokens() -> None:
    # CTRL rule: a positive logit is divided by the penalty, a negative one multiplied, unseen tokens untouched
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = filter_logits(logits, _cfg(repetition_penalty=2.0), prev_ids=torch.tensor([[0, 1, 0]]))
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    assert torch.equal(filter_logits(logits, _cfg(), prev_ids=torch.tensor([[0, 1]])), logits)


def test_repetition_penalty_can_change_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.0]])
    cfg = SamplingConfig(temperature=0.0, repetition_penalty=2.0)
    assert sample_next(logits, cfg, prev_ids=torch.tensor([[0]])).item() == 1


def test_fit_prompt_keeps_the_prompt_and_gives_the_reply_what_is_left() -> None:
    # context 16: a 10-token prompt stays whole whatever max_new_tokens asks; the reply gets min(asked, 16 - 10)
    assert fit_prompt(list(range(10)), 4, 16) == (list(range(10)), 4)
    assert fit_prompt(list(range(10)), 8, 16) == (list(range(10)), 6)
    assert fit_prompt(list(range(10)), 50, 16) == (list(range(10)), 6)
    assert fit_prompt(list(range(15)), 50, 16) == (list(range(15)), 1)


def test_fit_prompt_cuts_only_a_prompt_that_fills_the_context_keeping_its_end() -> None:
    # the cut leaves 16 // 8 = 2 tokens for the reply (fewer only when fewer are asked for)
    assert fit_prompt(list(range(16)), 50, 16) == (list(range(2, 16)), 2)
    assert fit_prompt(list(range(40)), 50, 16) == (list(range(26, 40)), 2)
    assert fit_prompt(list(range(40)), 1, 16) == (list(range(25, 40)), 1)


def _model(seed: int = 0, **overrides: Any) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_model_config(64, **overrides)).eval()


@torch.no_grad()
def _naive_greedy(model: Transformer, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    ids, steps = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([ids]))["logits"][0, -1]  # [V], full recompute
        steps.append(logits)
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :], steps


@pytest.mark.parametrize("moe_every", [1, 2])
def test_kv_cached_greedy_matches_full_recompute(moe_every: int) -> None:
    model = _model(moe_every=moe_every)
    prompt = [1, 5, 9, 2, 33, 7]
    expected, _ = _naive_greedy(model, prompt, 30)
    seen: list[int] = []
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=30)
    got = generate(model, prompt, cfg, stop_ids=set(), on_token=seen.append)
    assert got == expected
    assert seen == got


def test_prefix_is_prefilled_once_then_one_token_per_step() -> None:
    model = ScriptedModel(tiny_model_config(64), script=[3, 4, 5, 6, 7, 8])
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=6)
    out = generate(model, [1, 2, 3, 4, 5], cfg, stop_ids=set())  # type: ignore[arg-type]
    assert out == [3, 4, 5, 6, 7, 8]
    assert model.fed_tokens == 5 + 5  # prompt once, then the 5 tokens that were sampled from (not the last one)


def test_stops_at_stop_id_without_including_it() -> None:
    model = ScriptedModel(tiny_model_config(64), script=[10, 11, 2, 12])
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=20)
    out = generate(model, [1], cfg, stop_ids={2, 60})  # type: ignore[arg-type]
    assert out == [10, 11]


def test_max_new_tokens_respected() -> None:
    model = _model()
    for n in (1, 7):
        assert len(generate(model, [1, 2, 3], SamplingConfig(temperature=1.0, max_new_tokens=n), stop_ids=set())) == n


def test_long_prompt_is_truncated_to_fit_max_seq_len() -> None:
    model = _model(max_seq_len=32)
    prompt = list(range(1, 60))
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=10)
    # 59 tokens in a context of 32: the last 28 stay, and the reply gets the 32 // 8 = 4 left
    assert generate(model, prompt, cfg, stop_ids=set()) == _naive_greedy(model, prompt[-28:], 4)[0]


def test_seeded_sampling_is_reproducible() -> None:
    model = _model()
    cfg = SamplingConfig(temperature=1.5, top_p=1.0, top_k=0, max_new_tokens=25, seed=123)
    first = generate(model, [1, 2, 3], cfg, stop_ids=set())
    torch.manual_seed(999)  # the global RNG must not matter
    assert generate(model, [1, 2, 3], cfg, stop_ids=set()) == first
    other = generate(model, [1, 2, 3], SamplingConfig(**{**cfg.__dict__, "seed": 124}), stop_ids=set())
    assert other != first


def test_empty_prompt_raises() -> None:
    with pytest.raises(ConfigError):
        generate(_model(), [], SamplingConfig(), stop_ids=set())
