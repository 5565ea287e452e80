"""Full model weights under our parameter names from a sharded engine (ZeRO-3 gather, expert gather), streamed to
safetensors shards by rank 0, one tensor at a time.

Every rank calls `write_consolidated` (it runs collectives in the same parameter order everywhere). A rank other than
0 never holds more than one gathered tensor; rank 0 holds at most one shard's worth plus the tensor in flight. The
weights keep the module's dtype: bf16 under bf16 precisions, fp32 in fp32 runs.
"""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lumina_ds.run_dir import write_shards

AUTOEP_RENAMES = (
    (".ffn.router.gate.", ".ffn.gate."),
    (".ffn.shared_experts_gate.", ".ffn.shared_gate."),
    (".ffn.shared_experts.", ".ffn.shared."),
)
NATIVE_GATE = ".ffn.moe.deepspeed_moe.gate.wg."
NATIVE_EXPERT = re.compile(
    r"^(layers\.\d+\.ffn)\.moe\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(w[123])\.weight$"
)
DEFAULT_SHARD_BYTES = 5 * 2**30


def _gathered(param: nn.Parameter) -> contextlib.AbstractContextManager[object]:
    """The whole of this rank's tensor for the duration of the context (ZeRO-3 partitions gathered)."""
    if hasattr(param, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([param])
    return contextlib.nullcontext()


def _expert_group(param: nn.Parameter) -> dist.ProcessGroup | None:
    name = getattr(param, "group_name", None)
    if name is None or not dist.is_initialized():
        return None
    from deepspeed.utils import groups

    return groups._get_expert_parallel_group(name)


def _gather_to_rank0(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> list[torch.Tensor] | None:
    """Every expert-parallel shard of `tensor`, in group order, copied to the CPU on global rank 0; None elsewhere.

    Only rank 0's expert-parallel group takes part (the other groups hold copies of the same experts), and the other
    ranks keep no copy: they send the tensor they hold.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    if group is None or dist.get_world_size(group) == 1:
        return [tensor.detach().to("cpu", copy=True)] if rank == 0 else None
    members = dist.get_process_group_ranks(group)
    if 0 not in members:
        return None
    local = tensor.detach().cuda() if dist.get_backend(group) == "nccl" else tensor.detach()
    shards = [torch.empty_like(local) for _ in members] if rank == 0 else None
    dist.gather(local, gather_list=shards, dst=0, group=group)
    return [s.to("cpu", copy=True) for s in shards] if shards is not None else None


def consolidated_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, full tensor on the CPU) on rank 0, in parameter order; nothing on other ranks (they only help)."""
    native: dict[tuple[str, str], dict[int, list[torch.Tensor]]] = defaultdict(dict)
    for name, param in module.named_parameters():
        is_expert = getattr(param, "allreduce", True) is False
        with _gathered(param):
            shards = _gather_to_rank0(param.data, _expert_group(param) if is_expert else None)
        if shards is None:
            continue
        match = NATIVE_EXPERT.match(name)
        if match:  # one Linear per local expert: regrouped into stacked [E, ...] once the layer's experts are in
            native[(match.group(1), match.group(3))][int(match.group(2))] = shards
            continue
        for old, new in (*AUTOEP_RENAMES, (NATIVE_GATE, ".ffn.gate.")):
            name = name.replace(old, new)
        yield name, torch.cat(shards) if is_expert else shards[0]  # AutoEP: [E/ep, ...] per rank -> [E, ...]
    for (prefix, weight), by_local in native.items():
        num_local, ep = len(by_local), len(by_local[0])
        # global expert g = ep_rank * num_local + local index
        yield (
            f"{prefix}.experts.{weight}",
            torch.stack([by_local[g % num_local][g // num_local] for g in range(ep * num_local)]),
        )


def write_consolidated(module: nn.Module, directory: Path, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """Write the module's full weights into `directory` as safetensors of at most `max_shard_bytes` each (one tensor
    larger than that gets a shard of its own). Collective; rank 0 writes and returns the files, others return []."""
    return write_shards(consolidated_tensors(module), directory, max_shard_bytes=max_shard_bytes)
