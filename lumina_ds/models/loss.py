"""LM head + cross-entropy over chunks of tokens, with no [tokens, vocab] tensor kept for backward.

The plain loss (`F.cross_entropy(lm_head(h).float(), y)`) keeps the logits, their fp32 copy and the log-softmax of
every token alive until backward: 10 bytes per token per vocabulary entry under bf16 autocast, the largest activation
of a small-hidden, large-vocabulary model. Here each chunk's logits are computed, turned into the loss and into the
gradients of the hidden states and of the head's weight at once (the softmax minus the one-hot target, as Liger's
fused linear cross-entropy does), and freed. Backward then only scales the stored gradients: no recompute, the same
three matmuls per chunk as the plain path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

CHUNK_ELEMENTS = 1 << 22  # logits per chunk: 16 MiB in fp32, whatever the vocabulary
MIN_CHUNK_TOKENS = 128  # below this the weight-gradient matmul gets too thin to run fast


def chunk_tokens_for(vocab_size: int) -> int:
    """Tokens per chunk: CHUNK_ELEMENTS logits, at least MIN_CHUNK_TOKENS tokens."""
    return max(MIN_CHUNK_TOKENS, CHUNK_ELEMENTS // vocab_size)


class ChunkBuffers:
    """The chunks' logits and gradients, allocated once per loss and reused by every chunk: a fresh tensor of this
    size is an mmap from the allocator, page-faulted anew for each chunk (the logits matmul ran at ~115 GFLOP/s
    into fresh memory and ~150 into a reused buffer, fp32 on the 2-core CPU)."""

    def __init__(self, rows: int, weight: torch.Tensor) -> None:
        vocab, dtype = weight.shape[0], weight.dtype
        self.raw = torch.empty(rows, vocab, dtype=dtype, device=weight.device)  # [c, V] in the weight's dtype
        self.fp32 = self.raw if dtype == torch.float32 else torch.empty_like(self.raw, dtype=torch.float32)
        self.weight_grad = None if dtype == torch.float32 else torch.empty_like(weight)  # [V, H]

    def logits(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """h [c, H] -> fp32 logits [c, V] (computed in the weight's dtype, then widened)."""
        raw = torch.mm(h, weight.T, out=self.raw[: h.shape[0]])
        return raw if self.fp32 is self.raw else self.fp32[: h.shape[0]].copy_(raw)

    def in_weight_dtype(self, probs: torch.Tensor) -> torch.Tensor:
        """The logits' gradient [c, V] in the weight's dtype, for the two gradient matmuls."""
        return probs if self.fp32 is self.raw else self.raw[: probs.shape[0]].copy_(probs)

    def accumulate_weight_grad(self, grad_w: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor) -> None:
        """grad_w [V, H] fp32 += dlogits.T @ h, summed over chunks in fp32."""
        if self.weight_grad is None:
            grad_w.addmm_(dlogits.T, h)
        else:
            grad_w += torch.mm(dlogits.T, h, out=self.weight_grad)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over targets of cross-entropy(hidden @ weight.T, labels); gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, param: torch.Tensor, labels: torch.Tensor, ignore_index: int, chunk: int
    ) -> torch.Tensor:
        """param: the head's weight as stored; the matmuls take it in hidden's dtype, and its gradient is summed
        in fp32 and returned in the parameter's own dtype (no round trip through a lower precision)."""
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        weight = param.to(hidden.dtype)  # [V, H]: autocast's cast of the weight, once per loss
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = hidden.new_zeros((), dtype=torch.float32)
        buffers = ChunkBuffers(min(chunk, hidden.shape[0]), weight)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            logits = buffers.logits(h, weight)  # [c, V] fp32, rounded as the plain path's logits.float()
            valid = y != ignore_index
            target = y.masked_fill(~valid, 0)[:, None]  # [c, 1]
            target_logit = logits.gather(1, target).squeeze(1)  # [c]
            row_max = logits.amax(dim=-1, keepdim=True)  # [c, 1]
            exp = logits.sub_(row_max).exp_()  # in place of the logits: one exp serves the loss and the softmax
            sums = exp.sum(dim=-1)  # [c]
            total += ((sums.log() + row_max.squeeze(1) - target_logit) * valid).sum()  # logsumexp - target
            if not (need_h or need_w):
                continue
            probs = exp.mul_((valid / sums)[:, None])  # softmax; ignored rows: zero
            probs.scatter_add_(1, target, -valid[:, None].to(probs.dtype))  # minus the one-hot target
            dlogits = buffers.in_weight_dtype(probs)
            if grad_h is not None:
                torch.mm(dlogits, weight, out=grad_h[start : start + chunk])
            if grad_w is not None:
                buffers.accumulate_weight_grad(grad_w, dlogits, h)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = param.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, ignore_index: int, chunk_tokens: int = 0
) -> torch.Tensor:
    """Summed cross-entropy of `hidden [..., H] @ weight.T` against `labels [...]` (fp32 scalar), chunked.

    Under autocast the inputs are cast once to the autocast dtype, as `F.linear` would cast them; the logits are
    rounded to that dtype before the fp32 softmax, exactly as in the plain path. The weight's gradient stays fp32 for
    an fp32 parameter (the plain path rounds it to the autocast dtype and back). chunk_tokens 0: chunk_tokens_for(V).
    """
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        hidden = hidden.to(torch.get_autocast_dtype(device))
    chunk = chunk_tokens or chunk_tokens_for(weight.shape[0])
    with torch.autocast(device, enabled=False):  # the matmuls run in the dtype chosen above
        loss: torch.Tensor = _LinearCrossEntropy.apply(
            hidden.flatten(0, -2), weight, labels.flatten(), ignore_index, chunk
        )
    return loss


class LMHead(nn.Linear):
    """The output projection (no bias); given labels it returns the summed chunked loss instead of the logits.

    The loss runs inside this module's forward so that ZeRO-3, which gathers a module's parameters around its own
    forward call, has the (possibly tied) weight gathered while the chunks use it.
    """

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__(hidden_size, vocab_size, bias=False)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, *, ignore_index: int = -100) -> torch.Tensor:
        if labels is None:
            return super().forward(x)
        return linear_cross_entropy(x, self.weight, labels, ignore_index=ignore_index)
