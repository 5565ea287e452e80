"""The chunked LM-head cross-entropy: the plain loss and gradients exactly, without [tokens, vocab] saved tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lumina_ds.batch import IGNORE_INDEX
from lumina_ds.models.config import ModelConfig, MoEConfig
from lumina_ds.models.loss import LMHead, chunk_tokens_for, linear_cross_entropy
from lumina_ds.models.transformer import Transformer

N, H, V = 3 * 37, 24, 97  # odd sizes: the last chunk of 16 is partial


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = IGNORE_INDEX
    labels[-3:] = IGNORE_INDEX  # the whole tail of the last chunk too
    return hidden, weight, labels


def loss_and_grads(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunked: bool, bf16: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if chunked:
            summed = linear_cross_entropy(h, w, labels, ignore_index=IGNORE_INDEX, chunk_tokens=16)
        else:  # the model's plain path
            summed = F.cross_entropy(F.linear(h, w).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    loss = summed / (labels != IGNORE_INDEX).sum()
    loss.backward()
    assert h.grad is not None and w.grad is not None
    return loss.detach(), h.grad, w.grad


def test_fp32_loss_and_gradients_equal_the_plain_ones() -> None:
    hidden, weight, labels = inputs()
    loss, gh, gw = loss_and_grads(hidden, weight, labels, chunked=True)
    ref_loss, ref_gh, ref_gw = loss_and_grads(hidden, weight, labels, chunked=False)
    assert ref_loss > 1.0  # a non-trivial loss
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(gh, ref_gh, rtol=0, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=0, atol=1e-6)
    assert gh[labels == IGNORE_INDEX].abs().max() == 0  # ignored tokens send no gradient
    assert gh[labels != IGNORE_INDEX].abs().amin(dim=-1).min() > 0


def test_bf16_autocast_matches_the_plain_path_within_bf16_rounding() -> None:
    hidden, weight, labels = inputs(1)
    loss, gh, gw = loss_and_grads(hidden, weight, labels, chunked=True, bf16=True)
    ref_loss, ref_gh, ref_gw = loss_and_grads(hidden, weight, labels, chunked=False, bf16=True)
    assert gh.dtype == ref_gh.dtype == torch.float32 and gw.dtype == torch.float32  # back to the fp32 leaves
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)  # same bf16 logits, fp32 softmax
    for grad, ref in ((gh, ref_gh), (gw, ref_gw)):
        assert (grad - ref).abs().max() < 1e-2 * ref.abs().max()  # bf16 keeps 8 bits: ~0.4% per rounding
    # the head's gradient is summed in fp32 and handed to the fp32 weight as it is; the plain path rounds it to bf16
    assert not torch.equal(gw, gw.bfloat16().float()) and torch.equal(ref_gw, ref_gw.bfloat16().float())


def test_lm_head_without_labels_is_the_plain_linear() -> None:
    head = LMHead(H, V)
    x = torch.randn(2, 5, H)
    torch.testing.assert_close(head(x), x @ head.weight.T, rtol=0, atol=0)
    assert chunk_tokens_for(8192) == 512 and chunk_tokens_for(1 << 20) == 128


def tiny_model(*, tie: bool) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=211, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
        max_seq_len=64, tie_embeddings=tie, init_std=0.1,
        moe=MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=32),
    )  # fmt: skip
    return Transformer(cfg)


def model_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 211, (3, 29), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = IGNORE_INDEX
    labels[0, :7] = IGNORE_INDEX
    return ids, labels


@pytest.mark.parametrize("tie", [True, False])
def test_training_forward_equals_the_plain_loss_and_gradients(tie: bool) -> None:
    """Training with labels takes the chunked path; eval (with grad) the plain one: the same loss and every gradient."""
    model = tiny_model(tie=tie)
    ids, labels = model_batch()
    grads = []
    for training in (True, False):
        model.train(training)
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=labels)
        assert ("logits" in out) is not training
        out["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if training:
            loss = out["loss"].detach()
        else:
            torch.testing.assert_close(out["loss"].detach(), loss, rtol=0, atol=1e-6)
    chunked, plain = grads
    assert chunked.keys() == plain.keys() and ("lm_head.weight" in plain) is not tie
    for name, g in plain.items():
        torch.testing.assert_close(chunked[name], g, rtol=1e-5, atol=1e-6, msg=name)


def saved_bytes(model: Transformer, ids: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(total, largest) bytes of the distinct tensors the forward saves for backward."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=labels)["loss"].backward()
    return sum(saved.values()), max(saved.values())


def test_chunked_loss_saves_no_tokens_by_vocabulary_tensor() -> None:
    model = tiny_model(tie=False)
    ids, labels = model_batch()
    logits_bytes = ids.numel() * 211 * 4  # one fp32 [tokens, V]
    total_chunked, largest_chunked = saved_bytes(model.train(), ids, labels)
    total_plain, largest_plain = saved_bytes(model.eval(), ids, labels)
    assert largest_plain >= logits_bytes  # the plain path keeps the fp32 log-softmax for backward
    assert largest_chunked < logits_bytes // 2
    # what the chunked path saves instead: fp32 gradients of the head weight [V, H] and of the hidden states
    assert total_plain - total_chunked >= logits_bytes - 4 * (211 * 32 + ids.numel() * 32)
