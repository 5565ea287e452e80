"""Parameter and FLOP counts by component, from a meta-device build (no memory is allocated)."""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from dataclasses import dataclass

from lumina_ds.models.config import ModelConfig
from lumina_ds.models.transformer import meta_transformer

COMPONENT_ORDER = ("embedding", "lm_head", "attention", "norms", "router", "experts", "shared_experts", "dense_mlp")


def component_of(param_name: str) -> str:
    """Map a parameter name of Transformer to its component."""
    parts = param_name.split(".")
    if parts[0] in ("embed", "lm_head"):
        return "embedding" if parts[0] == "embed" else "lm_head"
    if len(parts) >= 2 and parts[-2].endswith("norm"):
        return "norms"
    if "attn" in parts:
        return "attention"
    if "gate" in parts:
        return "router"
    if "experts" in parts:
        return "experts"
    if "shared" in parts or "shared_gate" in parts:
        return "shared_experts"
    return "dense_mlp"


@dataclass(frozen=True)
class ModuleSizes:
    """Sizes in a meta-device build of a model: every parameter (tied ones once) and each module's own parameters."""

    params: tuple[tuple[str, int], ...]  # (parameter name, numel)
    modules: tuple[tuple[str, int], ...]  # (module name, numel of the parameters it holds itself)
    # each module's own parameters by their name in `params`, in registration order, which is the order forward
    # calls them (models/transformer.py builds modules as it calls them): the trace ZeRO-3 records
    owned: tuple[tuple[str, ...], ...]


_SIZES: dict[str, ModuleSizes] = {}


def module_sizes(config: ModelConfig) -> ModuleSizes:
    """The sizes of `config`'s model, built once per distinct config: the planner asks for them for every layout it
    weighs, and a large preset's meta build walks thousands of modules."""
    key = json.dumps(dataclasses.asdict(config), sort_keys=True)
    if key not in _SIZES:
        model = meta_transformer(config)
        params = tuple((name, p.numel()) for name, p in model.named_parameters())
        modules = tuple(
            (name, sum(p.numel() for p in m.parameters(recurse=False))) for name, m in model.named_modules()
        )
        name_of = {id(p): name for name, p in model.named_parameters()}  # a tied weight under its first name
        owned = tuple(tuple(name_of[id(p)] for p in m.parameters(recurse=False)) for m in model.modules())
        _SIZES[key] = ModuleSizes(params, modules, owned)
    return _SIZES[key]


@dataclass(frozen=True)
class ParameterCount:
    total: int
    active: int  # parameters a token passes through: top_k of num_experts routed experts
    by_component: dict[str, int]
    flops_per_token: float  # training (fwd + bwd) FLOPs per token at seq_len, 6*N_compute + 12*L*d*s

    def as_dict(self) -> dict[str, object]:
        return {
            "total": self.total,
            "active": self.active,
            "by_component": self.by_component,
            "flops_per_token": self.flops_per_token,
        }


def count_parameters(config: ModelConfig, *, seq_len: int | None = None) -> ParameterCount:
    """Counts of a meta-device build: the same module tree training uses, so the numbers cannot drift."""
    by_component: dict[str, int] = defaultdict(int)
    for name, numel in module_sizes(config).params:  # tied weights are listed once
        by_component[component_of(name)] += numel
    counts = {c: by_component.get(c, 0) for c in COMPONENT_ORDER}
    total = sum(counts.values())
    moe = config.moe
    inactive = counts["experts"] - counts["experts"] * moe.top_k // moe.num_experts if moe.enabled else 0
    active = total - inactive
    # compute per token: every active weight except the embedding lookup, plus the output projection
    compute_params = active - counts["embedding"] - counts["lm_head"] + config.vocab_size * config.hidden_size
    s = seq_len or config.max_seq_len
    attention_width = config.num_heads * config.head_dim  # hidden_size unless head_dim is set apart
    flops = 6.0 * compute_params + 12.0 * config.num_layers * attention_width * s
    return ParameterCount(total=total, active=active, by_component=counts, flops_per_token=flops)
