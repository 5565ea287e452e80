"""Packed rows: a conversation's logits, losses and gradients do not depend on its row-mates, on every attention path.

Paths: dense SDPA mask (CPU default), flex_attention BlockMask (forward-only on CPU, eager and compiled) and
flash-attn varlen, whose kernel cannot run here (no GPU): a stand-in `flash_attn` module that runs SDPA per sequence
proves the data plumbing (flattening, cu_seqlens, re-shaping, one mask per forward, checkpointing).
"""

from __future__ import annotations

import copy
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lumina_ds.models.attention as attention_module
import lumina_ds.models.transformer as transformer_module
from lumina_ds.batch import IGNORE_INDEX
from lumina_ds.errors import ConfigError
from lumina_ds.models.attention import (
    Attention,
    DocumentMask,
    build_document_mask,
    document_block_mask,
    document_causal_mask,
    document_cu_seqlens,
    document_ids,
    flex_document_attention,
    resolve_backend,
)
from lumina_ds.models.config import ModelConfig, MoEConfig
from lumina_ds.models.layers import RotaryEmbedding
from lumina_ds.models.transformer import Transformer

VOCAB, ROW = 64, 32
Conversation = tuple[torch.Tensor, torch.Tensor]  # input_ids [L], labels [L]


def tiny_model(backend: str = "auto", seed: int = 0) -> Transformer:
    """Two layers, both our MoE block (4 experts, top-2): routing is per token, so neighbours cannot leak through it."""
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
        max_seq_len=ROW, tie_embeddings=False, init_std=0.1, attention_backend=backend,
        moe=MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=32),
    )  # fmt: skip
    return Transformer(config).eval()


def conversation(seed: int, length: int) -> Conversation:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (length,), generator=g)
    labels = torch.randint(1, VOCAB, (length,), generator=g)
    labels[: length // 3] = IGNORE_INDEX  # the prompt part has no targets, as chat rows do
    return ids, labels


def pack(convs: list[Conversation], seq_len: int = ROW) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row as lumina_ds.data.loading.packing builds it: positions restart per conversation; padding has position 0,
    token 0 and no target. -> input_ids, labels, position_ids, each [1, seq_len]."""
    ids = torch.zeros(seq_len, dtype=torch.long)
    labels = torch.full((seq_len,), IGNORE_INDEX)
    positions = torch.zeros(seq_len, dtype=torch.long)
    start = 0
    for conv_ids, conv_labels in convs:
        stop = start + len(conv_ids)
        ids[start:stop], labels[start:stop] = conv_ids, conv_labels
        positions[start:stop] = torch.arange(len(conv_ids))
        start = stop
    assert start <= seq_len
    return ids[None], labels[None], positions[None]


X, A, B = conversation(0, 9), conversation(1, 6), conversation(2, 8)
# X alone (padded), X after A and before B, X last after B and A: X starts at 0, 6 and 14
LAYOUTS = {"alone": ([X], 0), "middle": ([A, X, B], 6), "last": ([B, A, X], 14)}


def x_outputs(model: Transformer, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """X's logits [9, V] and per-token losses [9] (0 where X has no target) inside the given row layout."""
    convs, start = LAYOUTS[layout]
    ids, _, positions = pack(convs)
    logits = model(ids, position_ids=positions)["logits"][0, start : start + len(X[0])]
    losses = F.cross_entropy(logits, X[1], ignore_index=IGNORE_INDEX, reduction="none")
    return logits, losses


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_logits_and_losses_of_a_conversation_do_not_depend_on_packing(backend: str) -> None:
    model = tiny_model(backend)
    with torch.no_grad():  # flex_attention runs forward-only on CPU
        alone_logits, alone_losses = x_outputs(model, "alone")
        for layout in ("middle", "last"):
            logits, losses = x_outputs(model, layout)
            torch.testing.assert_close(logits, alone_logits, rtol=0, atol=1e-5)
            torch.testing.assert_close(losses, alone_losses, rtol=0, atol=1e-5)
        assert (alone_losses > 0).sum() == (X[1] != IGNORE_INDEX).sum()  # the loss comparison covers X's targets
        # non-vacuous: without the document mask (one long document) X sees A and its logits move
        ids, _, _ = pack(LAYOUTS["middle"][0])
        leaky = model(ids, position_ids=torch.arange(ROW)[None])["logits"][0, 6:15]
        assert (leaky - alone_logits).abs().max() > 1e-2


def test_gradients_from_one_conversations_loss_do_not_depend_on_packing() -> None:
    model = tiny_model("sdpa")
    grads = {}
    for layout in LAYOUTS:
        model.zero_grad()
        _, losses = x_outputs(model, layout)
        losses.sum().backward()
        grads[layout] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert set(grads["alone"]) == {name for name, _ in model.named_parameters()}  # every parameter is compared
    for layout in ("middle", "last"):
        for name, g in grads[layout].items():
            torch.testing.assert_close(g, grads["alone"][name], rtol=1e-5, atol=1e-6, msg=name)


def test_checkpointed_layers_see_the_same_document_mask() -> None:
    plain = tiny_model("sdpa").train()
    checked = copy.deepcopy(plain)
    checked.set_recompute("full")
    ids, labels, positions = pack(LAYOUTS["middle"][0])
    out_plain, out_checked = plain(ids, labels, positions), checked(ids, labels, positions)
    out_plain["loss"].backward()
    out_checked["loss"].backward()
    torch.testing.assert_close(out_checked["loss"], out_plain["loss"], rtol=0, atol=1e-6)
    for (name, p), q in zip(checked.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


# --- cu_seqlens for flash-attn varlen -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("position_ids", "cu_seqlens", "max_seqlen"),
    [
        # documents of 3 and 2 tokens, then 3 padding tokens (position 0 each: one-token documents)
        ([[0, 1, 2, 0, 1, 0, 0, 0]], [0, 3, 5, 6, 7, 8], 3),
        # two rows: the second row's documents start at flattened offsets 4 and 6
        ([[0, 1, 2, 3], [0, 1, 0, 1]], [0, 4, 6, 8], 4),
        # a row that does not start at position 0 still starts a document there (as document_ids does)
        ([[5, 6, 0, 1], [0, 1, 2, 3]], [0, 2, 4, 8], 4),
        # three rows with one padding token at the end of the first two
        ([[0, 1, 2, 0], [0, 0, 1, 0], [0, 1, 2, 3]], [0, 3, 4, 5, 7, 8, 12], 4),
    ],
)
def test_cu_seqlens_hand_computed(position_ids: list[list[int]], cu_seqlens: list[int], max_seqlen: int) -> None:
    pos = torch.tensor(position_ids)
    before = pos.clone()
    cu, longest = document_cu_seqlens(pos)
    assert cu.dtype == torch.int32 and cu.tolist() == cu_seqlens
    assert longest == max_seqlen and isinstance(longest, int)
    assert torch.equal(pos, before)  # the caller's position_ids are untouched


def test_cu_seqlens_segments_are_the_dense_masks_documents() -> None:
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 3, (3, 20), generator=g).cumsum(-1) * (torch.rand(3, 20, generator=g) > 0.25)
    cu, _ = document_cu_seqlens(pos)
    seq_of_token = torch.zeros(3 * 20, dtype=torch.long)
    seq_of_token[cu[1:-1].long()] = 1
    seq_of_token = seq_of_token.cumsum(0).view(3, 20)  # flattened sequence index of each token
    same_seq = seq_of_token[:, :, None] == seq_of_token[:, None, :]
    same_doc = document_ids(pos)[:, :, None] == document_ids(pos)[:, None, :]
    assert torch.equal(same_seq, same_doc)
    assert torch.equal(document_causal_mask(pos)[:, 0], same_seq & torch.ones(20, 20, dtype=torch.bool).tril())


# --- flex_attention vs SDPA -----------------------------------------------------------------------------------------


def qkv_and_positions(seq_len: int = 40) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GQA shapes (4 query heads, 2 KV heads); rows with several documents and trailing padding."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, seq_len, 16), torch.randn(2, 2, seq_len, 16), torch.randn(2, 2, seq_len, 16)
    row0 = [*range(11), *range(17), *range(seq_len - 28 - 4), 0, 0, 0, 0]
    row1 = [*range(5), *range(seq_len - 5)]
    return q, k, v, torch.tensor([row0, row1])


def sdpa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(pos), enable_gqa=True)


def test_flex_block_mask_equals_dense_sdpa_mask_with_gqa() -> None:
    q, k, v, pos = qkv_and_positions()
    block_mask = document_block_mask(pos)
    assert block_mask.shape == (2, 1, 40, 40)
    torch.testing.assert_close(
        flex_document_attention(q, k, v, block_mask), sdpa_reference(q, k, v, pos), rtol=0, atol=1e-5
    )


def test_compiled_flex_path_equals_dense_sdpa_mask() -> None:
    """What CUDA runs (compiled block-mask builder and kernel), compiled here for CPU: ~10-20 s of compilation."""
    q, k, v, pos = qkv_and_positions(seq_len=32)
    block_mask = document_block_mask(pos, compiled=True)
    eager = document_block_mask(pos)
    assert torch.equal(block_mask.kv_num_blocks, eager.kv_num_blocks)
    assert torch.equal(block_mask.kv_indices, eager.kv_indices)
    out = flex_document_attention(q, k, v, block_mask, compiled=True)
    torch.testing.assert_close(out, sdpa_reference(q, k, v, pos), rtol=0, atol=1e-5)


# --- flash-attn varlen, with a CPU stand-in for the kernel ----------------------------------------------------------


def fake_flash_attn(calls: list[torch.Tensor]) -> types.ModuleType:
    """A `flash_attn` module whose varlen function checks flash-attn's input contract and runs SDPA per sequence."""

    def flash_attn_varlen_func(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
        max_q: int, max_k: int, *, causal: bool,
    ) -> torch.Tensor:  # fmt: skip
        assert q.dim() == 3 and k.shape == v.shape and k.shape[0] == q.shape[0] and q.shape[2] == k.shape[2]
        assert cu_q.dtype == torch.int32 and cu_q is cu_k and causal
        assert max_q == max_k == int(cu_q.diff().max()) and int(cu_q[-1]) == q.shape[0]
        calls.append(cu_q)
        out = torch.empty_like(q)
        for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
            qi, ki, vi = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, L, hd]
            out[s:e] = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=True)[0].transpose(0, 1)
        return out

    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = flash_attn_varlen_func  # type: ignore[attr-defined]
    return module


@pytest.fixture
def flash_calls(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    calls: list[torch.Tensor] = []
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn(calls))
    return calls


def test_flash_varlen_plumbing_equals_dense_mask_in_attention(flash_calls: list[torch.Tensor]) -> None:
    torch.manual_seed(0)
    attn = Attention(hidden_size=64, num_heads=4, num_kv_heads=2)
    _, _, _, pos = qkv_and_positions()
    x = torch.randn(2, 40, 64)
    rope = RotaryEmbedding(16, theta=10000.0)(pos)
    with torch.no_grad():
        flash = attn(x, rope, mask=build_document_mask(pos, "flash"))
        dense = attn(x, rope, mask=build_document_mask(pos, "sdpa"))
    assert len(flash_calls) == 1 and flash_calls[0].tolist() == [0, 11, 28, 36, 37, 38, 39, 40, 45, 80]
    torch.testing.assert_close(flash, dense, rtol=0, atol=1e-6)


def spy(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    calls: list[int] = []
    real: Callable[..., object] = getattr(module, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("checkpointing", [False, True])
def test_flash_varlen_model_path_builds_cu_seqlens_once(
    flash_calls: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch, checkpointing: bool
) -> None:
    reference = tiny_model("sdpa").train()
    model = copy.deepcopy(reference)
    model.set_recompute("full" if checkpointing else "none")
    ids, labels, positions = pack(LAYOUTS["middle"][0])
    expected = reference(ids, labels, positions)
    expected["loss"].backward()
    # resolution needs CUDA and bf16 (tested below); here the flash path is forced to run its plumbing in fp32 on CPU
    monkeypatch.setattr(transformer_module, "resolve_backend", lambda *a, **k: "flash")
    cu_builds = spy(monkeypatch, attention_module, "document_cu_seqlens")
    out = model(ids, labels, positions)
    out["loss"].backward()
    assert len(cu_builds) == 1  # once per forward, shared by the layers
    assert len(flash_calls) == len(model.layers) * (2 if checkpointing else 1)  # recomputation calls it again
    assert all(c is flash_calls[0] for c in flash_calls)  # the same cu_seqlens tensor in every layer
    assert flash_calls[0].tolist() == [0, 6, 15, 23, *range(24, ROW + 1)]  # A, X, B, then 9 padding tokens
    torch.testing.assert_close(out["loss"], expected["loss"], rtol=0, atol=1e-6)  # training: no logits returned
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


# --- backend selection ------------------------------------------------------------------------------------------------

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def fake_flash(monkeypatch: pytest.MonkeyPatch, available: bool, capability: tuple[int, int] = (9, 0)) -> None:
    """flash-attn importable or not, on a GPU of `capability` (no CUDA needed)."""
    status = attention_module.FlashAttnStatus(
        available, "flash-attn 2.8" if available else "flash-attn is not installed"
    )
    monkeypatch.setattr(attention_module, "flash_attn_status", lambda: status)
    monkeypatch.setattr(attention_module, "cuda_capability", lambda device: capability)


def test_auto_and_explicit_flash_need_an_ampere_or_newer_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_flash(monkeypatch, True, capability=(7, 0))  # V100
    assert resolve_backend("auto", device=CUDA, dtype=torch.float16, needs_grad=True) == "flex"
    with pytest.raises(ConfigError, match=r"compute capability 8\.0 or newer, this GPU has 7\.0") as info:
        resolve_backend("flash", device=CUDA, dtype=torch.float16, needs_grad=True)
    assert info.value.code == "E003"


def test_a_flash_attn_that_does_not_import_is_unavailable_with_its_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The usual broken install: the package is there, its extension was built against another torch."""
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text(
        'raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    attention_module.flash_attn_status.cache_clear()
    try:
        status = attention_module.flash_attn_status()
        assert not status.available and "undefined symbol" in status.detail
        monkeypatch.setattr(attention_module, "cuda_capability", lambda device: (9, 0))
        assert resolve_backend("auto", device=CUDA, dtype=torch.bfloat16, needs_grad=True) != "flash"
        with pytest.raises(ConfigError, match="does not import: ImportError") as info:
            resolve_backend("flash", device=CUDA, dtype=torch.bfloat16, needs_grad=True)
        assert info.value.code == "E003"
        from lumina_ds.planning.environment import flash_attn_report

        assert flash_attn_report()["importable"] is False and "undefined symbol" in flash_attn_report()["detail"]
    finally:
        attention_module.flash_attn_status.cache_clear()


@pytest.mark.parametrize(
    ("device", "dtype", "flash", "flex", "expected"),
    [
        (CPU, torch.float32, True, True, "sdpa"),  # CPU always takes the dense mask
        (CPU, torch.bfloat16, True, True, "sdpa"),
        (CUDA, torch.bfloat16, True, True, "flash"),
        (CUDA, torch.float16, True, False, "flash"),
        (CUDA, torch.float32, True, True, "flex"),  # flash-attn has no fp32 kernels
        (CUDA, torch.bfloat16, False, True, "flex"),
        (CUDA, torch.bfloat16, False, False, "sdpa"),
    ],
)
def test_auto_backend_selection(
    monkeypatch: pytest.MonkeyPatch, device: torch.device, dtype: torch.dtype, flash: bool, flex: bool, expected: str
) -> None:
    fake_flash(monkeypatch, flash)
    monkeypatch.setattr(attention_module, "FLEX_ATTENTION_AVAILABLE", flex)
    assert resolve_backend("auto", device=device, dtype=dtype, needs_grad=True) == expected


@pytest.mark.parametrize(
    ("requested", "device", "dtype", "needs_grad", "flash", "flex", "error"),
    [
        ("flash", CUDA, torch.bfloat16, True, False, True, "flash-attn is not installed"),
        ("flash", CPU, torch.bfloat16, True, True, True, "CUDA in fp16/bf16 only"),
        ("flash", CUDA, torch.float32, True, True, True, "CUDA in fp16/bf16 only"),
        ("flex", CUDA, torch.bfloat16, True, True, False, "needs torch>=2.5"),
        ("flex", CPU, torch.float32, True, True, True, "no backward on cpu"),
        ("flash", CUDA, torch.bfloat16, True, True, True, None),
        ("flex", CUDA, torch.float32, True, False, True, None),
        ("flex", CPU, torch.float32, False, False, True, None),  # forward-only on CPU runs
        ("sdpa", CUDA, torch.bfloat16, True, True, True, None),  # never overridden by auto's choice
        ("sdpa", CPU, torch.float32, True, False, False, None),
    ],
)
def test_explicit_backend_runs_or_raises_e003(
    monkeypatch: pytest.MonkeyPatch, requested: str, device: torch.device, dtype: torch.dtype, needs_grad: bool,
    flash: bool, flex: bool, error: str | None,
) -> None:  # fmt: skip
    fake_flash(monkeypatch, flash)
    monkeypatch.setattr(attention_module, "FLEX_ATTENTION_AVAILABLE", flex)
    if error is None:
        assert resolve_backend(requested, device=device, dtype=dtype, needs_grad=needs_grad) == requested
        return
    with pytest.raises(ConfigError, match=error) as info:
        resolve_backend(requested, device=device, dtype=dtype, needs_grad=needs_grad)
    assert info.value.code == "E003" and "--attention-backend auto" in info.value.hint


@pytest.mark.parametrize("backend", ["flash", "flex"])
def test_explicit_backend_that_cannot_train_here_fails_at_first_forward(
    monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    fake_flash(monkeypatch, False)
    model = tiny_model(backend).train()  # building works: `plan` and parameter counts need no kernel
    ids, labels, positions = pack(LAYOUTS["middle"][0])
    with pytest.raises(ConfigError) as info:
        model(ids, labels, positions)
    assert info.value.code == "E003"


def test_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="use one of auto, sdpa, flash, flex") as info:
        ModelConfig(attention_backend="xformers").validate()
    assert info.value.code == "E002"


def test_kv_cache_decoding_stays_on_sdpa_with_flex_chosen() -> None:
    """Generation passes no document mask: flex (forward-only on CPU) decodes like SDPA recomputation."""
    model = tiny_model("flex")
    ids = X[0][None]
    with torch.no_grad():
        full = tiny_model("sdpa")(ids)["logits"]
        cache = model.new_kv_cache()
        steps = [model(ids[:, :5], kv_cache=cache)["logits"]]
        steps += [model(ids[:, t : t + 1], kv_cache=cache)["logits"] for t in range(5, ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_document_mask_is_a_named_tuple_zero3_hooks_can_walk() -> None:
    mask = build_document_mask(torch.tensor([[0, 1, 0, 1]]), "sdpa")
    assert isinstance(mask, tuple) and mask.backend == "sdpa" and mask.dense is not None
    assert mask.block_mask is None and mask.cu_seqlens is None
    assert DocumentMask("flash").max_seqlen == 0
