"""--compile: regional torch.compile of the blocks computes what eager does, without graph breaks where compiled."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._inductor.config

from lumina_ds.config.presets import get_preset
from lumina_ds.distributed.parallelize import parallelize
from lumina_ds.errors import ConfigError
from tests.models.test_transformer import batch, build


def test_compiled_blocks_give_the_eager_loss_and_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)  # no worker pool to start for two graphs
    eager = build(init_std=0.1, moe={"dense_layers": [0]}).train()  # layer 0 dense, layer 1 MoE
    compiled = copy.deepcopy(eager)
    run = get_preset("debug")
    run.model, run.train.compile, run.train.activation_checkpointing = eager.config, True, "selective"
    parallelize(compiled, run, rank=0)  # as training applies it: with attention recompute around the compiled region
    eager.set_recompute("attention")
    regions = [
        hasattr(f, "_torchdynamo_orig_callable") for b in compiled.blocks() for f in (b.attention, b.feed_forward)
    ]
    assert regions == [True, True, True, False]  # the MoE FFN sub-block stays eager
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]  # same checkpoints
    ids, labels = batch(batch_size=2, seq_len=12)
    expected, got = eager(ids, labels=labels), compiled(ids, labels=labels)
    expected["loss"].backward()
    got["loss"].backward()
    torch.testing.assert_close(got["loss"], expected["loss"], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["metrics"]["aux_loss"], expected["metrics"]["aux_loss"], rtol=0, atol=1e-5)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_the_compiled_regions_have_no_graph_breaks() -> None:
    model = build(moe={"dense_layers": [0]}).train()
    block = model.blocks()[0]
    x = torch.randn(2, 12, model.config.hidden_size)
    rope = model.rope(torch.arange(12).expand(2, 12))
    for region, args in ((block.attention, (x, rope, None)), (block.feed_forward, (x,))):
        explained = torch._dynamo.explain(region)(*args)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compile_at_zero3_is_refused() -> None:
    run = get_preset("debug")
    run.train.compile, run.distributed.zero_stage = True, 3
    with pytest.raises(ConfigError, match="not supported at ZeRO stage 3"):
        run.validate()
