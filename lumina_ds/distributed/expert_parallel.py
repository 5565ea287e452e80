"""Where experts live: AutoEP (DeepSpeed replaces our MoE blocks) or the native `deepspeed.moe.layer.MoE`.

The MoE math (router losses) stays in `lumina_ds.models.moe`; this module only moves experts across ranks and
re-attaches the router-logits hook to whichever gate computes the routing after replacement.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from lumina_ds.errors import ConfigError
from lumina_ds.models.config import MoEConfig
from lumina_ds.models.layers import SwiGLU
from lumina_ds.models.moe import MoEBlock, RouterLogitsCollector
from lumina_ds.models.transformer import Transformer


def moe_layer_indices(model: Transformer) -> list[int]:
    return [i for i, layer in enumerate(model.layers) if isinstance(layer.ffn, MoEBlock)]


def autoep_section(model: Transformer, *, ep_size: int, cuda: bool) -> dict[str, Any]:
    """DeepSpeed's `expert_parallel` config for our block names (only MoE layers match the pattern). On CUDA with
    experts spread over ranks, the split plan's device-to-host copy overlaps the token packing (`async_split_plan`):
    without it AutoEP waits for the host once per MoE layer per pass; DeepSpeed refuses it on CPU tensors."""
    moe = model.config.moe
    indices = "|".join(str(i) for i in moe_layer_indices(model))
    section: dict[str, Any] = {
        "enabled": True,
        "autoep_size": ep_size,
        "moe_layer_pattern": rf"layers\.({indices})\.ffn",
        "router_pattern": "gate",
        "expert_pattern": "experts",
        "expert_w1": "w1",
        "expert_w2": "w2",
        "expert_w3": "w3",
        "top_k": moe.top_k,
        "score_func": "softmax",
        "route_norm": moe.norm_topk_prob,  # Qwen2-MoE / OLMoE weight experts by the raw softmax probabilities
        "has_shared_experts": moe.num_shared_experts > 0,
        "use_grouped_mm": True,
    }
    if cuda and ep_size > 1:
        section["async_split_plan"] = True
    if moe.num_shared_experts:  # naming a pattern without shared experts makes DeepSpeed warn on every rank
        section["shared_experts_pattern"] = "shared"
    if moe.shared_expert_gate:  # AutoEP scales the shared expert by sigmoid(shared_experts_gate(x)), as our block
        section["shared_experts_gate_pattern"] = "shared_gate"
    return section


class NativeMoEBlock(nn.Module):
    """Our MoE block re-expressed as DeepSpeed's native MoE layer (capacity factor, token dropping, ZeRO <= 2)."""

    def __init__(self, source: MoEBlock, *, moe: MoEConfig, ep_size: int, ep_rank: int, deterministic: bool) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        num_experts, ffn, hidden = source.experts.w1.shape
        self.moe = MoE(
            hidden,
            SwiGLU(hidden, ffn),
            num_experts=num_experts,
            ep_size=ep_size,
            k=moe.top_k,
            capacity_factor=moe.capacity_factor,
            eval_capacity_factor=moe.eval_capacity_factor,
            min_capacity=moe.min_capacity,
            drop_tokens=moe.drop_tokens,
            use_rts=not deterministic,
            top2_2nd_expert_sampling=not deterministic,
        )
        self.shared = source.shared
        self._copy_from(source, ep_rank=ep_rank)

    @property
    def gate(self) -> nn.Linear:
        return self.moe.deepspeed_moe.gate.wg

    def report_drops(self, collector: RouterLogitsCollector) -> None:
        """Hand each forward's count of routes the capacity limit dropped to the collector.

        DeepSpeed computes the count and throws it away: its TopKGate returns (l_aux, capacity, E, indices [k, T],
        locations, gates, exp_counts) to MOELayer, with every route evicted by the capacity limit flagged by a
        negative expert index (sharded_moe.top1gating/top2gating/topkgating with sparse_routes); exp_counts is taken
        before the limit.
        """

        def record(_module: nn.Module, _inputs: Any, output: tuple[torch.Tensor, ...]) -> None:
            assert len(output) == 7, "DeepSpeed's TopKGate output changed: see NativeMoEBlock.report_drops"
            collector.record_dropped((output[3] < 0).sum())

        self.moe.deepspeed_moe.gate.register_forward_hook(record)

    @torch.no_grad()
    def _copy_from(self, source: MoEBlock, *, ep_rank: int) -> None:
        self.gate.weight.copy_(source.gate.weight)
        local = self.moe.num_local_experts
        for i, expert in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
            g = ep_rank * local + i  # experts are laid out contiguously by expert-parallel rank
            for w in ("w1", "w2", "w3"):
                getattr(expert, w).weight.copy_(getattr(source.experts, w)[g])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the gate's logits feed our load-balancing and z losses through the collector hook;
        # DeepSpeed's own gate recomputes them in fp32 for dispatch (its l_aux is not used)
        self.gate(x)
        out, _l_aux, _counts = self.moe(x)  # [B, S, H]
        if self.shared is not None:
            out = out + self.shared(x)
        return out


def apply_native_moe(model: Transformer, *, ep_size: int, ep_rank: int, deterministic: bool) -> None:
    moe = model.config.moe
    raw_top_k = not moe.norm_topk_prob and moe.top_k > 1
    if moe.shared_expert_gate or raw_top_k:  # refused, not approximated
        what = "top-k weights that are not renormalised (its top-2/top-k gates renormalise)" if raw_top_k else ""
        raise ConfigError(
            "E002",
            "the native DeepSpeed MoE layer cannot compute this model: "
            + (what or "a sigmoid-gated shared expert (it has no shared-expert gate)"),
            "use --moe-backend autoep (Qwen2-MoE, OLMoE and Qwen3-MoE without norm_topk_prob need it)",
        )
    for idx in moe_layer_indices(model):
        block = model.layers[idx]
        assert isinstance(block.ffn, MoEBlock)
        block.ffn = NativeMoEBlock(
            block.ffn, moe=model.config.moe, ep_size=ep_size, ep_rank=ep_rank, deterministic=deterministic
        )
        block.ffn.report_drops(model.router_logits)
    attach_router_hooks(model)


def router_gates(model: nn.Module) -> list[nn.Module]:
    """The Linear that computes each MoE layer's logits, whichever implementation holds it."""
    gates: list[nn.Module] = []
    for name, module in model.named_modules():
        if re.fullmatch(r"layers\.\d+\.ffn", name):
            router = getattr(module, "router", None)  # AutoEP's TokenChoiceTopKRouter
            gate = router.gate if router is not None else getattr(module, "gate", None)
            if gate is not None:
                gates.append(gate)
    return gates


def attach_router_hooks(model: Transformer) -> None:
    gates = router_gates(model)
    assert len(gates) == model.num_moe_layers, f"found {len(gates)} routers for {model.num_moe_layers} MoE layers"
    model.router_logits.attach(gates)
