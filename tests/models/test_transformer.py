"""The full model: overfitting, loss masking and composition, dense / interleaved layouts, checkpointing, tying."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lumina_ds.models.transformer as transformer_module
from lumina_ds.batch import IGNORE_INDEX
from lumina_ds.models.config import ModelConfig, MoEConfig
from lumina_ds.models.layers import SwiGLU
from lumina_ds.models.moe import MoEBlock, load_balancing_loss, router_z_loss
from lumina_ds.models.transformer import Transformer


def tiny_config(**overrides: object) -> ModelConfig:
    moe_fields: dict[str, object] = dict(num_experts=4, top_k=2, expert_intermediate_size=64)
    moe_fields.update(overrides.pop("moe", {}))  # type: ignore[call-overload]
    fields: dict[str, object] = dict(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
        max_seq_len=64, moe=MoEConfig(**moe_fields),  # type: ignore[arg-type]
    )  # fmt: skip
    fields.update(overrides)
    return ModelConfig(**fields)  # type: ignore[arg-type]


def build(seed: int = 0, **overrides: object) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_config(**overrides))


def batch(seed: int = 0, batch_size: int = 4, seq_len: int = 16, vocab: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g)
    return tokens[:, :-1].clone(), tokens[:, 1:].clone()  # labels pre-shifted: labels[t] is the token after input t


def test_tiny_moe_overfits_one_batch() -> None:
    model = build().train()
    ids, labels = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = last = None
    for _step in range(300):
        out = model(ids, labels=labels)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        last = out["lm_loss"].item()
        first = last if first is None else first
        if last < 0.1:
            break
    assert first is not None and first > 3.0  # starts near ln(64) = 4.16
    assert last is not None and last < 0.1, f"lm_loss {last:.3f} after 300 steps"


def test_lm_loss_is_cross_entropy_over_non_ignored_positions() -> None:
    model = build(init_std=0.2)
    ids, labels = batch(batch_size=2, seq_len=10)
    labels = labels.clone()
    labels[0, :4] = IGNORE_INDEX
    labels[1, 7:] = IGNORE_INDEX
    out = model(ids, labels=labels)  # training with labels: the chunked loss, no logits returned
    assert "logits" not in out
    logits = model(ids)["logits"].detach()
    total, n = 0.0, 0
    for b in range(2):
        for t in range(10):
            if labels[b, t] != IGNORE_INDEX:
                total += -float(logits[b, t].log_softmax(-1)[labels[b, t]])
                n += 1
    assert n == 20 - 4 - 3 == int(out["num_targets"])
    assert out["lm_loss"].item() == pytest.approx(total / n, abs=1e-5)
    # the ignored positions' own targets would have changed the loss
    assert (
        abs(float(F.cross_entropy(logits.flatten(0, 1), batch(batch_size=2, seq_len=10)[1].flatten())) - total / n)
        > 1e-3
    )


def test_ignored_positions_have_no_effect_on_loss_or_gradients() -> None:
    model = build(init_std=0.2)
    ids, labels = batch(batch_size=2, seq_len=10)
    labels[:, :3] = IGNORE_INDEX
    other_ids = ids.clone()
    other_ids[:, -1] = (other_ids[:, -1] + 5) % 64  # the last input only predicts a (now ignored) label
    labels_last_ignored = labels.clone()
    labels_last_ignored[:, -1] = IGNORE_INDEX
    a = model(ids, labels=labels_last_ignored)
    b = model(other_ids, labels=labels_last_ignored)
    # causal: the last input position only influences its own logits, whose target is ignored
    torch.testing.assert_close(a["lm_loss"], b["lm_loss"], rtol=0, atol=1e-6)

    out = model.eval()(ids, labels=labels)  # eval keeps the logits (the chunked loss's gradients: test_chunked_loss)
    logits = out["logits"]
    logits.retain_grad()
    out["lm_loss"].backward()
    assert logits.grad is not None
    assert logits.grad[:, :3].abs().max() == 0
    assert logits.grad[:, 3:].abs().min(dim=-1).values.min() > 0


def test_all_targets_ignored_gives_zero_loss_with_a_graph() -> None:
    model = build()
    ids, _ = batch(batch_size=2, seq_len=6)
    out = model(ids, labels=torch.full_like(ids, IGNORE_INDEX))
    assert out["lm_loss"].item() == 0.0
    assert int(out["num_targets"]) == 0
    out["loss"].backward()  # must not raise


def test_total_loss_combines_lm_aux_and_z_with_config_weights() -> None:
    model = build(moe={"load_balancing_weight": 0.3, "router_z_loss_weight": 0.05}, init_std=0.3)
    ids, labels = batch(batch_size=2, seq_len=8)
    gate_inputs: list[torch.Tensor] = []
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    hooks = [b.gate.register_forward_hook(lambda m, inp, out: gate_inputs.append(inp[0].detach())) for b in blocks]
    out = model(ids, labels=labels)
    for h in hooks:
        h.remove()
    # recompute the router logits independently from the gates' inputs and weights
    router_logits = [x @ b.gate.weight.detach().T for x, b in zip(gate_inputs, blocks, strict=True)]
    aux = sum(float(load_balancing_loss(r, 2)) for r in router_logits) / 2
    z = sum(float(router_z_loss(r)) for r in router_logits) / 2
    assert out["metrics"]["aux_loss"].item() == pytest.approx(aux, abs=1e-5)
    assert out["metrics"]["z_loss"].item() == pytest.approx(z, abs=1e-5)
    expected = out["lm_loss"].item() + 0.3 * out["metrics"]["aux_loss"].item() + 0.05 * out["metrics"]["z_loss"].item()
    assert out["loss"].item() == pytest.approx(expected, abs=1e-5)
    assert out["loss"].item() - out["lm_loss"].item() > 0.3  # the aux term is really in there


def test_dense_model_has_no_router() -> None:
    model = build(moe={"num_experts": 0})
    assert not any(isinstance(m, MoEBlock) for m in model.modules())
    assert all(isinstance(layer.ffn, SwiGLU) for layer in model.layers)
    assert not any("gate" in name or "experts" in name for name, _ in model.named_parameters())
    assert model.num_moe_layers == 0
    ids, labels = batch(batch_size=2, seq_len=8)
    out = model(ids, labels=labels)
    assert model(ids)["logits"].shape == (2, 8, 64)
    assert out["metrics"]["aux_loss"].item() == 0.0 and out["metrics"]["z_loss"].item() == 0.0
    assert out["loss"].item() == out["lm_loss"].item()
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_moe_every_two_puts_moe_on_every_second_layer() -> None:
    model = build(num_layers=4, moe={"moe_every": 2})
    kinds = [type(layer.ffn) for layer in model.layers]
    assert kinds == [SwiGLU, MoEBlock, SwiGLU, MoEBlock]  # 1-based layers 2 and 4
    assert model.num_moe_layers == 2
    ids, labels = batch(batch_size=2, seq_len=8)
    out = model(ids, labels=labels)
    assert out["metrics"]["expert_counts"].shape == (2, 4)
    assert out["metrics"]["expert_counts"].sum(dim=1).tolist() == [2 * 8 * 2] * 2


def test_gradient_checkpointing_gives_identical_loss_and_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = build(init_std=0.1).train()
    checked = copy.deepcopy(plain)
    checked.set_recompute("full")
    calls = []
    real_checkpoint = transformer_module.checkpoint

    def counting_checkpoint(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real_checkpoint(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(transformer_module, "checkpoint", counting_checkpoint)
    ids, labels = batch(batch_size=2, seq_len=12)
    out_plain = plain(ids, labels=labels)
    out_plain["loss"].backward()
    assert calls == []
    out_checked = checked(ids, labels=labels)
    out_checked["loss"].backward()
    assert len(calls) == len(checked.layers)  # every layer went through checkpoint
    for key in ("loss", "lm_loss"):
        torch.testing.assert_close(out_checked[key], out_plain[key], rtol=0, atol=1e-6)
    for key in ("aux_loss", "z_loss"):
        torch.testing.assert_close(out_checked["metrics"][key], out_plain["metrics"][key], rtol=0, atol=1e-6)
    grads_plain = dict(plain.named_parameters())
    for name, p in checked.named_parameters():
        g0 = grads_plain[name].grad
        assert p.grad is not None and g0 is not None, name
        torch.testing.assert_close(p.grad, g0, rtol=1e-5, atol=1e-7, msg=name)


def test_tied_embeddings_share_storage() -> None:
    tied = build(tie_embeddings=True)
    assert tied.lm_head.weight is tied.embed.weight
    assert tied.lm_head.weight.data_ptr() == tied.embed.weight.data_ptr()
    names = [name for name, _ in tied.named_parameters()]
    assert "embed.weight" in names and "lm_head.weight" not in names
    # a gradient step on the head moves the embedding
    ids, labels = batch(batch_size=1, seq_len=4)
    tied(ids, labels=labels)["lm_loss"].backward()
    with torch.no_grad():
        before = tied.embed.weight.clone()
        tied.lm_head.weight -= 0.1 * tied.lm_head.weight.grad  # type: ignore[operator]
    assert not torch.equal(before, tied.embed.weight)

    untied = build(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()
    assert "lm_head.weight" in [name for name, _ in untied.named_parameters()]
