"""Grouped-query causal self-attention with RoPE and a KV cache; packed-document masks for SDPA, flex and flash-attn.

Packed rows hold several documents; position_ids restart at 0 where each begins. A token may attend only to earlier
tokens of its own document. The transformer resolves the attention backend and builds the matching `DocumentMask`
once per forward; every layer reuses it:

- sdpa: a dense [B, 1, S, S] bool mask for F.scaled_dot_product_attention (any device; O(B*S^2) memory).
- flex: a flex_attention BlockMask (compiled on CUDA; O(B*(S/128)^2) block metadata).
- flash: cu_seqlens over the flattened batch for flash_attn_varlen_func (CUDA, fp16/bf16; nothing S^2).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lumina_ds.errors import ConfigError
from lumina_ds.models.layers import RMSNorm, apply_rotary

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

FLEX_ATTENTION_AVAILABLE = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
HALF_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MIN_CAPABILITY = (8, 0)  # flash-attn 2: Ampere and newer


class FlashAttnStatus(NamedTuple):
    available: bool
    detail: str  # the version, or why it cannot be used


@functools.cache
def flash_attn_status() -> FlashAttnStatus:
    """Whether flash-attn really imports, tried once per process.

    A package that is present can still fail to load: a flash-attn built against another torch dies with
    "undefined symbol" at import, which `find_spec` never sees.
    """
    if importlib.util.find_spec("flash_attn") is None:
        return FlashAttnStatus(False, "flash-attn is not installed")
    try:
        import flash_attn
        from flash_attn import flash_attn_func, flash_attn_varlen_func  # noqa: F401  (both paths must load)
    except Exception as exc:  # ImportError, OSError (undefined symbol), RuntimeError from its CUDA checks
        return FlashAttnStatus(False, f"flash-attn is installed but does not import: {type(exc).__name__}: {exc}")
    return FlashAttnStatus(True, f"flash-attn {getattr(flash_attn, '__version__', '(unknown version)')}")


def cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def flash_unusable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why flash-attn cannot run this forward, or None when it can."""
    status = flash_attn_status()
    if not status.available:
        return status.detail
    if device.type != "cuda" or dtype not in HALF_DTYPES:
        return f"flash-attn runs on CUDA in fp16/bf16 only, this forward is on {device.type} in {dtype}"
    if cuda_capability(device) < FLASH_MIN_CAPABILITY:
        major, minor = cuda_capability(device)
        return f"flash-attn 2 needs compute capability 8.0 or newer, this GPU has {major}.{minor}"
    return None


class DocumentMask(NamedTuple):
    """Attention metadata of one forward, built once and shared by all layers.

    A NamedTuple rather than a dataclass: DeepSpeed ZeRO-3's module hooks walk tuples but not other objects.
    Only the field of `backend` is set; with none set the forward is plain causal.
    """

    backend: str  # resolved path: "sdpa" | "flex" | "flash"
    dense: torch.Tensor | None = None  # sdpa: [B, 1, S, T] bool, True = may attend
    block_mask: BlockMask | None = None  # flex
    cu_seqlens: torch.Tensor | None = None  # flash: [num_docs + 1] int32 offsets into the flattened B*S tokens
    max_seqlen: int = 0  # flash: longest document, in tokens


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """position_ids [B, S] -> [B, S] index of each token's document within its row (a new one at each 0)."""
    return (position_ids == 0).cumsum(dim=-1)


def window_band(q_len: int, kv_len: int, window: int, device: torch.device) -> torch.Tensor:
    """[q_len, kv_len] bool, True where a key is within `window` tokens of the query (itself included).

    The queries are the last q_len of the kv_len positions (decoding after a cache); causality is separate.
    """
    q = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]  # [q_len, 1]
    k = torch.arange(kv_len, device=device)[None, :]  # [1, kv_len]
    return k > q - window  # as transformers' sliding_window_overlay


def document_causal_mask(position_ids: torch.Tensor, *, window: int = 0) -> torch.Tensor:
    """position_ids [B, S] restarting at 0 per packed document -> [B, 1, S, S] bool, True = may attend.

    Block-diagonal causal: a token sees earlier tokens of its own document only (the last `window` of them, itself
    included, when window > 0).
    """
    S = position_ids.shape[1]
    doc = document_ids(position_ids)  # [B, S]
    same_doc = doc[:, :, None] == doc[:, None, :]  # [B, S, S]
    causal = torch.ones(S, S, dtype=torch.bool, device=position_ids.device).tril()  # [S, S]
    if window:
        causal = causal & window_band(S, S, window, position_ids.device)
    return (same_doc & causal)[:, None]  # [B, 1, S, S]


def document_cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """position_ids [B, S] -> (cu_seqlens [D + 1] int32, max_seqlen): every document of every row is one sequence.

    The batch is flattened row-major to B*S tokens; a row's start always starts a document (as in
    `document_ids`). Reading max_seqlen syncs with the device once per forward: flash-attn takes it as an int.
    """
    B, S = position_ids.shape
    starts = position_ids == 0  # [B, S]
    starts[:, 0] = True
    offsets = starts.flatten().nonzero().flatten()  # [D] first token of each document
    end = torch.full((1,), B * S, dtype=offsets.dtype, device=offsets.device)
    cu_seqlens = torch.cat([offsets, end]).to(torch.int32)  # [D + 1]
    return cu_seqlens, int(cu_seqlens.diff().max())


def document_block_mask(position_ids: torch.Tensor, *, compiled: bool | None = None, window: int = 0) -> BlockMask:
    """position_ids [B, S] -> flex_attention BlockMask of `causal & same document` (heads share it), and within
    `window` tokens when window > 0.

    compiled (default: on CUDA) builds it without ever materializing the dense [B, S, S] mask.
    """
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    B, S = position_ids.shape
    doc = document_ids(position_ids)  # [B, S]

    def causal_same_doc(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

    def windowed(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return causal_same_doc(b, h, q_idx, kv_idx) & (kv_idx > q_idx - window)

    # a new closure per forward does not recompile: its captured tensor is a graph input. Eager on CPU: no compile
    compiled = position_ids.is_cuda if compiled is None else compiled
    build: Callable[..., object] = _compiled(create_block_mask) if compiled else create_block_mask
    block_mask = build(windowed if window else causal_same_doc, B, None, S, S, device=position_ids.device)
    assert isinstance(block_mask, BlockMask)
    return block_mask


def build_document_mask(position_ids: torch.Tensor, backend: str, *, window: int = 0) -> DocumentMask:
    """The DocumentMask of a forward over packed rows, in the form `backend` consumes (one per sliding window size).

    flash takes the window as an argument of each layer's call, so its mask is the same for every window.
    """
    if backend == "flash":
        cu_seqlens, max_seqlen = document_cu_seqlens(position_ids)
        return DocumentMask(backend, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    if backend == "flex":
        return DocumentMask(backend, block_mask=document_block_mask(position_ids, window=window))
    return DocumentMask(backend, dense=document_causal_mask(position_ids, window=window))


def resolve_backend(requested: str, *, device: torch.device, dtype: torch.dtype, needs_grad: bool) -> str:
    """The path a non-cached forward takes: "sdpa", "flex" or "flash". An explicit choice that cannot run is E003.

    auto: flash-attn on CUDA in fp16/bf16 when it imports and the GPU is sm_80+, else flex_attention on CUDA, else
    SDPA (always on CPU).
    """
    cuda = device.type == "cuda"
    if requested == "auto":
        if cuda and flash_unusable(device, dtype) is None:
            return "flash"
        return "flex" if cuda and FLEX_ATTENTION_AVAILABLE else "sdpa"
    if requested == "flash":
        _check_flash(device=device, dtype=dtype)
    elif requested == "flex":
        _check_flex(device=device, needs_grad=needs_grad)
    return requested


def _check_flash(*, device: torch.device, dtype: torch.dtype) -> None:
    reason = flash_unusable(device, dtype)
    if reason is not None:
        raise ConfigError(
            "E003",
            f"attention_backend 'flash' cannot run here: {reason}",
            "train with --precision bf16 on an Ampere-or-newer GPU with a flash-attn built for this torch "
            "(pip install -e .[flash]); or use --attention-backend auto (or sdpa), which picks a path this machine "
            "can run",
        )


def _check_flex(*, device: torch.device, needs_grad: bool) -> None:
    hint = "use --attention-backend auto (or sdpa), which picks a path this machine can run"
    if not FLEX_ATTENTION_AVAILABLE:
        raise ConfigError("E003", f"attention_backend 'flex' needs torch>=2.5, this is {torch.__version__}", hint)
    if device.type != "cuda" and needs_grad:
        raise ConfigError(
            "E003",
            f"attention_backend 'flex' has no backward on {device.type} (torch {torch.__version__}); "
            "it runs forward-only there",
            hint,
        )


@functools.cache
def _compiled(fn: Callable[..., object]) -> Callable[..., object]:
    """torch.compile once per process and function (flex kernels are only fused when compiled)."""
    return torch.compile(fn)


def flex_document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, *, compiled: bool | None = None
) -> torch.Tensor:
    """q [B, nh, S, hd], k/v [B, nkv, S, hd] -> [B, nh, S, hd]; compiled (default: on CUDA) or eager.

    Uncompiled flex_attention materializes the full score matrix: fine for CPU evaluation and tests only. On CPU it
    runs forward-only either way (torch has no CPU backward for it).
    """
    from torch.nn.attention.flex_attention import flex_attention

    attend: Callable[..., object] = flex_attention
    if q.is_cuda if compiled is None else compiled:
        attend = _compiled(flex_attention)
    out = attend(q, k, v, block_mask=block_mask, enable_gqa=True)
    assert isinstance(out, torch.Tensor)  # one tensor unless return_lse/return_aux is asked for
    return out


def flash_window(window: int) -> dict[str, tuple[int, int]]:
    """flash-attn's keyword for a sliding window: (left, right) = the window - 1 tokens before a query."""
    return {"window_size": (window - 1, 0)} if window else {}


def flash_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask, *, window: int = 0
) -> torch.Tensor:
    """q [B, nh, S, hd], k/v [B, nkv, S, hd] -> [B, S, nh, hd]: each document is one flash-attn sequence."""
    from flash_attn import flash_attn_varlen_func  # optional extra, GPU only

    assert mask.cu_seqlens is not None, "flash DocumentMask without cu_seqlens"
    B, nh, S, hd = q.shape

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(B * S, t.shape[1], hd)  # [B*S, heads, hd], row-major like cu_seqlens

    cu, longest = mask.cu_seqlens, mask.max_seqlen
    out = flash_attn_varlen_func(
        flat(q), flat(k), flat(v), cu, cu, longest, longest, causal=True, **flash_window(window)
    )  # GQA inside
    return out.view(B, S, nh, hd)


class LayerKVCache:
    """Keys and values of one layer for incremental decoding: [B, n_kv, T, hd] grown along T."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        backend: str = "auto",
        head_dim: int = 0,
        qkv_bias: bool = False,
        qk_norm: str = "none",
        norm_eps: float = 1e-5,
        window: int = 0,
    ) -> None:
        """head_dim 0: hidden_size // num_heads. qk_norm: RMSNorm of queries and keys before RoPE, per head ("head")
        or over the whole projection ("projection"). window > 0: attend to the last `window` tokens only."""
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.backend = backend  # requested; the transformer resolves it per forward into the DocumentMask
        self.window = window
        q_size, kv_size = num_heads * self.head_dim, num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden_size, q_size, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, kv_size, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(q_size, hidden_size, bias=False)
        self.qk_norm = qk_norm
        if qk_norm != "none":
            per_head = qk_norm == "head"
            self.q_norm = RMSNorm(self.head_dim if per_head else q_size, eps=norm_eps)
            self.k_norm = RMSNorm(self.head_dim if per_head else kv_size, eps=norm_eps)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, H] -> q [B, S, nh, hd], k/v [B, S, nkv, hd], queries and keys normalised when qk_norm says."""
        B, S, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.num_heads, self.head_dim)
        k = k.view(B, S, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v.view(B, S, self.num_kv_heads, self.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        *,
        mask: DocumentMask | None = None,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        """x [B, S, H]; mask from the transformer (None: plain causal, as in KV-cache decoding)."""
        B, S, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self._project(x))  # [B, nh, S, hd], [B, nkv, S, hd] x 2
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.update(k, v)  # [B, nkv, past+S, hd]
        out = self._attend(q, k, v, mask, past)  # [B, S, nh, hd]
        return self.o_proj(out.reshape(B, S, self.num_heads * self.head_dim))

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask | None, past: int
    ) -> torch.Tensor:
        """-> [B, S, nh, hd] by the path the mask names; document fields unset mean plain causal."""
        if mask is not None and mask.cu_seqlens is not None:
            return flash_varlen_attention(q, k, v, mask, window=self.window)
        if mask is not None and mask.block_mask is not None:
            return flex_document_attention(q, k, v, mask.block_mask).transpose(1, 2)
        dense = mask.dense if mask is not None else None
        if dense is None and self._use_flash(q, mask, past):
            return self._flash(q, k, v)
        # flex without documents also lands here: SDPA's fused causal kernel is at least as fast as a causal BlockMask
        return self._sdpa(q, k, v, dense, past).transpose(1, 2)

    def _use_flash(self, q: torch.Tensor, mask: DocumentMask | None, past: int) -> bool:
        if mask is not None:
            return mask.backend == "flash"  # resolved by the transformer: CUDA, fp16/bf16, installed
        # KV-cache decoding keeps its own rule: the first chunk may use flash-attn, later ones SDPA
        if self.backend not in ("auto", "flash") or past:
            return False
        return q.is_cuda and flash_unusable(q.device, q.dtype) is None

    def _flash(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from flash_attn import flash_attn_func  # optional extra, GPU only

        # flash-attn takes [B, S, heads, hd] and handles GQA itself
        qkv = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return flash_attn_func(*qkv, causal=True, **flash_window(self.window))

    def _sdpa(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, past: int
    ) -> torch.Tensor:
        S, T = q.shape[2], k.shape[2]
        windowed = 0 < self.window < T
        if attn_mask is None and ((past and S > 1) or windowed):
            # prefill after a cached prefix: query i sees keys up to past + i (and from past + i - window + 1 on)
            attn_mask = torch.ones(S, T, dtype=torch.bool, device=q.device).tril(diagonal=T - S)
            if windowed:
                attn_mask &= window_band(S, T, self.window, q.device)
        is_causal = attn_mask is None and S > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=True)
