"""Batched generation: left-padded rows of different lengths decode together and each equals its row decoded alone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from lumina_ds.errors import ConfigError
from lumina_ds.generation import SamplingConfig, generate
from lumina_ds.generation.batched import generate_batch
from lumina_ds.models.config import ModelConfig, MoEConfig
from lumina_ds.models.transformer import Transformer


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny forwards: on a shared CPU, a second OpenMP thread waiting on a busy core costs more than it brings."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LENGTHS = (3, 17, 1, 9)  # the longest row is not first, and one prompt is a single token


def moe_model(**overrides: object) -> Transformer:
    """fp32 MoE in every layer: each token's routing is its own, so padding must not change any real token."""
    torch.manual_seed(0)
    fields: dict[str, object] = dict(
        vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=64,
        max_seq_len=64, init_std=0.2, attention_backend="sdpa",
        moe=MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=32, moe_every=1),
    )  # fmt: skip
    fields.update(overrides)
    return Transformer(ModelConfig(**fields)).eval()  # type: ignore[arg-type]


def prompts_of(lengths: tuple[int, ...] = LENGTHS) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 97, (n,), generator=generator).tolist() for n in lengths]


GREEDY = SamplingConfig(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=12)


@pytest.mark.parametrize(
    ("overrides", "sampling"),
    [({}, GREEDY), ({"sliding_window": 5, "sliding_window_layers": [1]}, GREEDY),
     ({"qk_norm": "head"}, SamplingConfig(temperature=0.0, max_new_tokens=12, repetition_penalty=1.8))],
    ids=["moe", "sliding-window", "qk-norm-repetition-penalty"],
)  # fmt: skip
def test_greedy_batch_equals_each_row_alone(overrides: dict[str, object], sampling: SamplingConfig) -> None:
    # the window (5) is shorter than the longest prompt, so it cuts through real keys and padding alike; the penalty
    # reads the padded history, whose padding must not penalise an id the row never held
    model = moe_model(**overrides)
    prompts = prompts_of()
    alone = [generate(model, p, sampling, stop_ids=()) for p in prompts]
    assert generate_batch(model, prompts, sampling, stop_ids=()) == alone
    assert all(len(ids) == 12 for ids in alone)
    assert len({tuple(ids) for ids in alone}) == len(alone)  # distinct rows: a mix-up between rows would show


def test_a_stopped_row_leaves_the_batch() -> None:
    model = moe_model()
    prompts = prompts_of()
    free = [generate(model, p, GREEDY, stop_ids=()) for p in prompts]
    stop_ids = {free[1][2], free[2][5]}  # the longest prompt stops first: its padding columns are dropped with it
    alone = [generate(model, p, GREEDY, stop_ids=stop_ids) for p in prompts]
    assert min(len(ids) for ids in alone) <= 2 and max(len(ids) for ids in alone) > 5  # rows do end at different steps
    batch_sizes: list[tuple[int, int]] = []
    head_rows: list[int] = []
    hooks = [model.embed.register_forward_hook(lambda _m, args, _o: batch_sizes.append(tuple(args[0].shape))),
             model.lm_head.register_forward_hook(lambda _m, _a, out: head_rows.append(out.shape[1]))]  # fmt: skip
    try:
        batched = generate_batch(model, prompts, GREEDY, stop_ids=stop_ids)
    finally:
        for hook in hooks:
            hook.remove()
    assert batched == alone
    assert batch_sizes[0] == (4, 17)  # one prefill of the left-padded prompts
    assert set(head_rows) == {1}  # the prefill's LM head ran on the last position only, not on all 17
    # after sampling token t, the model runs on the rows that returned it (a row that stopped is no longer computed),
    # up to the last token of the budget, which needs no forward
    live = [sum(len(ids) > step for ids in alone) for step in range(GREEDY.max_new_tokens - 1)]
    assert [b for b, _ in batch_sizes[1:]] == live and all(s == 1 for _, s in batch_sizes[1:])
    assert live[0] == 4 and 1 <= live[-1] < 4  # the batch shrank and still ran


def test_all_rows_stopping_ends_generation() -> None:
    model = moe_model()
    prompts = prompts_of()
    first = {generate(model, p, GREEDY, stop_ids=())[0] for p in prompts}
    assert generate_batch(model, prompts, GREEDY, stop_ids=first) == [[], [], [], []]


def test_empty_prompt_is_refused() -> None:
    with pytest.raises(ConfigError, match="empty prompt"):
        generate_batch(moe_model(), [[1, 2], []], GREEDY, stop_ids=())


def test_rows_of_one_length_take_the_unpadded_path() -> None:
    # no padding: no mask is built, positions continue from the cache as in generate
    model = moe_model(sliding_window=4)
    prompts = prompts_of((6, 6, 6))
    assert generate_batch(model, prompts, GREEDY, stop_ids=()) == [
        generate(model, p, GREEDY, stop_ids=()) for p in prompts
    ]
