"""Mixture-of-Experts math: top-k softmax router, stacked SwiGLU experts, load-balancing and z losses.

The block is shaped like Hugging Face's and DeepSpeed AutoEP's (`gate` Linear(H, E), `experts.w1/w2/w3`
of shape [E, ...], optional `shared` expert) so that AutoEP can replace it and export is a renaming.
Where experts live across ranks is decided in `lumina_ds.distributed`, not here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lumina_ds.models.layers import SwiGLU


class Router(nn.Linear):
    """Gate logits computed in fp32 whatever the training precision (routing is precision-sensitive)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # autocast would cast the matmul back down
            return F.linear(x.float(), self.weight.float())


def route_top_k(logits: torch.Tensor, top_k: int, *, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k], expert indices [T, k]); normalize: the k weights sum to 1, else they are
    the softmax probabilities over all E experts (Qwen-MoE and OLMoE with norm_topk_prob off)."""
    probs = logits.softmax(dim=-1)  # [T, E]
    weights, indices = probs.topk(top_k, dim=-1)  # [T, k]
    return (weights / weights.sum(dim=-1, keepdim=True) if normalize else weights), indices


def tokens_per_expert(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Expert indices [T, k] -> [E] int64 assignments per expert. A scatter, not torch.bincount, which reads its
    input's maximum back to the host on CUDA: this runs in every MoE layer of every forward."""
    flat = indices.flatten()  # [T*k]
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def router_statistics(
    logits: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(load-balancing loss, z-loss, tokens per expert [E], routing entropy) of one layer's router logits [T, E],
    one top-k."""
    num_experts = logits.shape[-1]
    probs = logits.softmax(dim=-1)  # [T, E]
    indices = probs.topk(top_k, dim=-1).indices  # [T, k]
    counts = tokens_per_expert(indices, num_experts)  # [E]
    fraction = counts.to(probs.dtype) / indices.numel()  # [E]
    aux = num_experts * (fraction * probs.mean(dim=0)).sum()
    return aux, router_z_loss(logits), counts, router_entropy(logits.detach())


def router_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the entropy (nats) of the routing distribution softmax(logits [T, E]): ln E when routing
    is uniform, 0 when every token is sure of one expert."""
    log_probs = logits.log_softmax(dim=-1)  # [T, E]
    return -(log_probs.exp() * log_probs).sum(dim=-1).mean()


def load_balancing_loss(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch/GShard loss E * sum_i f_i * P_i; f_i = share of the T*k assignments to expert i, P_i = mean prob.

    Equals 1.0 for perfectly uniform routing and grows as routing collapses onto few experts.
    """
    return router_statistics(logits, top_k)[0]


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean squared log-partition, keeps router logits small."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def expert_counts(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Tokens routed to each expert (before any capacity limit) [E]."""
    return tokens_per_expert(logits.topk(top_k, dim=-1).indices, logits.shape[-1])


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would pick for x (grouped GEMMs are not on autocast's list)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


# Dropless expert parallelism (AutoEP) sends a rank every copy routed to its experts: the most copies one rank's
# experts receive, over the mean (top_k x its own tokens), that memory plans allow. The router's load-balancing loss
# keeps it near 1 in trained models; the `debug` runs log up to 1.8 at EP 2 (tests/monitor/test_rank_load.py), and a
# run that exceeds it is told so (monitor/callbacks.py MoESummary).
DROPLESS_IMBALANCE = 2.0


def rank_load_imbalance(counts: list[list[float]], expert_parallel_size: int) -> float:
    """The largest, over layers, of the tokens routed to one rank's experts over the mean per rank, with experts
    placed in contiguous blocks of E / ep as expert parallelism places them; counts [layers][E]."""
    worst = 0.0
    for layer in counts:
        block = len(layer) // expert_parallel_size
        loads = [sum(layer[r * block : (r + 1) * block]) for r in range(expert_parallel_size)]
        mean = sum(loads) / expert_parallel_size
        worst = max(worst, max(loads) / mean if mean > 0 else 0.0)
    return worst


def worst_rank_load(num_experts: int, top_k: int, expert_parallel_size: int) -> float:
    """The bound of rank_load_imbalance: every token sends min(top_k, E / ep) copies to the same rank."""
    return expert_parallel_size * min(top_k, num_experts // expert_parallel_size) / top_k


EXPERTS_PATH = "auto"  # auto | grouped | loop: benchmarks/moe_paths.py times each path; training keeps auto


def use_grouped_mm(x: torch.Tensor, *, widths: tuple[int, ...] = ()) -> bool:
    """torch._grouped_mm on CPU (measured faster, flat memory) and for bf16 on Hopper and newer GPUs (its CUDA
    kernel takes bf16 only); elsewhere the per-expert loop, which reads the counts back to the host.

    widths: the matrices' row lengths; grouped_mm needs each row to span a multiple of 16 bytes (an imported model
    may have an expert size that does not).
    """
    if EXPERTS_PATH != "auto" or not hasattr(torch, "_grouped_mm"):
        return EXPERTS_PATH == "grouped"
    itemsize = torch.empty((), dtype=compute_dtype(x)).element_size()
    if any(width * itemsize % 16 for width in widths):
        return False
    if x.device.type == "cpu":
        return True
    cuda_bf16 = x.device.type == "cuda" and compute_dtype(x) == torch.bfloat16
    return cuda_bf16 and torch.cuda.get_device_capability(x.device) >= (9, 0)


GROUP_ROW_MULTIPLE = 32  # rows per expert group are rounded up to this on CPU in bf16/fp16 (see below)


def group_row_multiple(x: torch.Tensor, *, assignments: int, num_experts: int) -> int:
    """The multiple each expert's row count is padded to. On CPU, oneDNN builds and caches one bf16/fp16 matmul
    primitive per shape: with the exact per-expert token counts every step brings new shapes, which costs ~40% of
    the expert matmuls' speed and grows memory without bound (benchmarks/NOTES.md). fp32 and GPUs gain nothing, nor
    do small batches (decoding: a few rows per expert, few shapes), where padding would multiply the work."""
    low_precision = compute_dtype(x) in (torch.bfloat16, torch.float16)
    small = assignments < 4 * GROUP_ROW_MULTIPLE * num_experts  # under 4 multiples per expert: > ~25% padding
    return GROUP_ROW_MULTIPLE if x.device.type == "cpu" and low_precision and not small else 1


def pad_groups(
    sorted_experts: torch.Tensor,
    token_of: torch.Tensor,
    route_weights: torch.Tensor,
    counts: torch.Tensor,
    multiple: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spread the expert-sorted assignments [T*k] over groups padded to `multiple` rows -> (source token [R],
    route weight [R, 1], rows per group [E]). A padding row repeats token 0 with weight 0: its output adds
    nothing and its gradients are exactly zero. Reads the counts on the host (CPU only)."""
    padded = (counts + multiple - 1) // multiple * multiple  # [E]
    shift = (padded.cumsum(0) - padded) - (counts.cumsum(0) - counts)  # [E] padded start - start
    rows = torch.arange(sorted_experts.numel(), device=counts.device) + shift[sorted_experts]  # [T*k]
    total = int(padded.sum())
    padded_tokens = token_of.new_zeros(total).index_copy_(0, rows, token_of)  # [R]
    padded_weights = route_weights.new_zeros(total, 1).index_copy(0, rows, route_weights)  # [R, 1]
    return padded_tokens, padded_weights, padded


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored stacked: w1/w3 [E, F, H], w2 [E, H, F]."""

    def __init__(self, *, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.w3 = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights/indices [T, k] -> [T, H]: tokens sorted by expert, then each expert's SwiGLU."""
        num_experts, top_k = self.w1.shape[0], indices.shape[1]
        flat = indices.flatten()  # [T*k]
        order = flat.argsort(stable=True)  # [T*k]
        token_of = order // top_k  # [T*k] source token of each sorted assignment
        counts = tokens_per_expert(flat, num_experts)  # [E]
        route_weights = weights.flatten()[order, None]  # [T*k, 1]
        grouped = use_grouped_mm(x, widths=tuple(self.w2.shape[1:]))  # (H, F)
        multiple = group_row_multiple(x, assignments=flat.numel(), num_experts=num_experts) if grouped else 1
        if multiple > 1:
            token_of, route_weights, counts = pad_groups(flat[order], token_of, route_weights, counts, multiple)
        xs = x[token_of]  # [R, H] grouped by expert (R = T*k, or more with padding rows)
        y = self._grouped(xs, counts) if grouped else self._looped(xs, counts)  # [R, H]
        y = y * route_weights.to(y.dtype)  # [R, H]; padding rows weigh 0
        return torch.zeros_like(x).index_add_(0, token_of, y.to(x.dtype))

    def _grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """All experts in one grouped GEMM per weight: no per-expert shapes, no host sync on the counts."""
        dtype = compute_dtype(xs)
        offs = counts.cumsum(0).to(torch.int32)  # [E] end row of each expert's group
        xs = xs.to(dtype)
        gate = torch._grouped_mm(xs, self.w1.to(dtype).transpose(1, 2), offs=offs)  # [T*k, F]
        up = torch._grouped_mm(xs, self.w3.to(dtype).transpose(1, 2), offs=offs)  # [T*k, F]
        return torch._grouped_mm(F.silu(gate) * up, self.w2.to(dtype).transpose(1, 2), offs=offs)  # [T*k, H]

    def _looped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        chunks = xs.split(counts.tolist())  # E chunks of [n_e, H]
        # unbind once: indexing w1[e] per expert would make backward zero-fill a full [E, F, H] gradient E times
        w1, w2, w3 = self.w1.unbind(0), self.w2.unbind(0), self.w3.unbind(0)
        outs = [F.linear(F.silu(F.linear(c, w1[e])) * F.linear(c, w3[e]), w2[e]) for e, c in enumerate(chunks)]
        return torch.cat(outs)  # [T*k, H]


class MoEBlock(nn.Module):
    def __init__(
        self,
        *,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        shared_intermediate_size: int = 0,
        shared_expert_gate: bool = False,
        norm_topk_prob: bool = True,
    ) -> None:
        """shared_expert_gate: the shared expert's output is scaled by sigmoid(shared_gate(x)), a Linear(H, 1)."""
        super().__init__()
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.gate = Router(hidden_size, num_experts, bias=False)
        self.experts = GroupedExperts(
            num_experts=num_experts, hidden_size=hidden_size, intermediate_size=intermediate_size
        )
        self.shared = SwiGLU(hidden_size, shared_intermediate_size) if shared_intermediate_size else None
        self.shared_gate = nn.Linear(hidden_size, 1, bias=False) if shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, H = x.shape
        flat = x.reshape(B * S, H)  # [T, H]
        weights, indices = route_top_k(self.gate(flat), self.top_k, normalize=self.norm_topk_prob)  # [T, k] each
        out = self.experts(flat, weights, indices)  # [T, H]
        if self.shared is not None:
            shared = self.shared(flat)  # [T, H]
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(flat)) * shared
            out = out + shared
        return out.view(B, S, H)


class RouterLogitsCollector:
    """Records each router's logits during a forward pass (a forward hook on every gate Linear).

    A hook rather than a return value so that the same losses are computed when DeepSpeed replaces the
    MoE block (AutoEP) or wraps it (native MoE): the expert-parallel code re-attaches it to their gates.
    A block with a capacity limit also records, per layer, the routes (token, expert) it dropped (`record_dropped`).
    """

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []
        self.dropped: list[torch.Tensor] = []  # 0-d int64 per MoE layer, for blocks that drop routes
        self._handles: list[Any] = []

    def attach(self, gates: list[nn.Module]) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = [gate.register_forward_hook(self._record) for gate in gates]

    def clear(self) -> None:
        self.logits.clear()
        self.dropped.clear()

    def record_dropped(self, routes: torch.Tensor) -> None:
        """The number of routes one layer's capacity limit dropped in this forward (a 0-d tensor, not read back)."""
        if not _recomputing():
            self.dropped.append(routes.detach().long().reshape(()))

    def _record(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if _recomputing():
            return
        logits = output[0] if isinstance(output, tuple) else output
        self.logits.append(logits.float().reshape(-1, logits.shape[-1]))


def _recomputing() -> bool:
    """Inside backward: activation checkpointing re-runs the gate there; the losses already have this forward's
    values, and keeping the recomputed ones would hold the recomputation's activations past the step."""
    return torch._C._current_graph_task_id() != -1
