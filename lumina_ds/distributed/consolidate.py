"""Full model weights under our parameter names from a sharded engine: ZeRO-3 gather + expert all-gather.

Every rank must call `consolidated_state_dict` (it runs collectives); only rank 0 gets the dict.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn

AUTOEP_RENAMES = ((".ffn.router.gate.", ".ffn.gate."), (".ffn.shared_experts.", ".ffn.shared."))
NATIVE_GATE = ".ffn.moe.deepspeed_moe.gate.wg."
NATIVE_EXPERT = re.compile(
    r"^(layers\.\d+\.ffn)\.moe\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(w[123])\.weight$"
)


def _full_tensor(param: nn.Parameter) -> torch.Tensor:
    if hasattr(param, "ds_id"):  # ZeRO-3 partitioned
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.data.detach().float().cpu().clone()
    return param.data.detach().float().cpu().clone()


def _expert_group(param: nn.Parameter) -> dist.ProcessGroup | None:
    name = getattr(param, "group_name", None)
    if name is None or not dist.is_initialized():
        return None
    from deepspeed.utils import groups

    return groups._get_expert_parallel_group(name)


def _gather_expert_shards(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """This rank's expert tensor from every rank of its expert-parallel group, in group-rank order."""
    if group is None or dist.get_world_size(group) == 1:
        return [tensor]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    local = tensor.to(device)
    shards = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, local, group=group)
    return [s.cpu() for s in shards]


def consolidated_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    native: dict[tuple[str, str], dict[int, list[torch.Tensor]]] = defaultdict(dict)
    for name, param in module.named_parameters():
        full = _full_tensor(param)
        is_expert = getattr(param, "allreduce", True) is False
        shards = _gather_expert_shards(full, _expert_group(param)) if is_expert else [full]
        match = NATIVE_EXPERT.match(name)
        if match:  # one Linear per local expert: regroup into stacked [E, ...] later
            native[(match.group(1), match.group(3))][int(match.group(2))] = shards
            continue
        name = name.replace(NATIVE_GATE, ".ffn.gate.")
        for old, new in AUTOEP_RENAMES:
            name = name.replace(old, new)
        state[name] = torch.cat(shards) if is_expert else full  # AutoEP: [E/ep, ...] per rank -> [E, ...]
    for (prefix, weight), by_local in native.items():
        num_local, ep = len(by_local), len(by_local[0])
        # global expert g = ep_rank * num_local + local index
        experts = [by_local[g % num_local][g // num_local] for g in range(ep * num_local)]
        state[f"{prefix}.experts.{weight}"] = torch.stack(experts)
    return state
