"""ZeRO-Infinity: optimizer states and parameters swapped to NVMe through DeepSpeed's AsyncIO op (libaio).

Two things live here: the DeepSpeed sections (`offload_optimizer`/`offload_param` at `device: nvme`, and `aio`),
whose buffers are derived from the model's shapes, and each run's swap directory.

How the buffers are derived (DeepSpeed 0.19.8, runtime/swap_tensor/ and runtime/zero/stage3.py):

- A tensor is swapped only if it has at least max(1 MiB, aio block_size) bytes (`MIN_AIO_BYTES`); smaller ones stay in
  host memory. `block_size` is 1 MiB, DeepSpeed's floor, so a larger block never keeps more tensors in RAM.
- Every swapped tensor is padded to 1 KiB x `intra_op_parallelism` (`AIO_ALIGNED_BYTES`). One I/O thread per handle
  (three handles per rank: parameter reads, parameter writes, optimizer): 8 ranks already run 24 I/O threads on a
  node, and more would take cores from CPU Adam. The buffer sizes below are rounded to that unit.
- `offload_param.buffer_size` (elements) must hold the largest parameter partition (`get_buffer` asserts
  `numel <= buffer_size`) and, when parameters live on NVMe as the optimizer starts, the largest optimizer sub-group
  partition (`_initialize_from_swapped_fp16_params` asserts every parameter buffer holds it). A sub-group closes once
  it reaches `sub_group_size`, so it is at most sub_group_size - 1 + the largest partition, and at most everything.
- `offload_param.buffer_count`: a parameter keeps its swap buffer from its read until ZeRO-3 releases it. ZeRO-3
  keeps a parameter gathered when it is used again within `stage3_max_reuse_distance` elements of the module trace:
  at the turn from forward to backward, the parameters of the modules whose reuse (2 x the elements after them) is
  within that distance are all held, and the next module's are read into free buffers (its NVMe prefetch uses only
  free buffers). So: the held ones, plus twice the most one module gathers at once (one module computing while the
  next one's parameters are read). A weight shared by two modules (tied embeddings) is held between its uses. The
  trace is taken without activation recompute, which gathers a block's parameters again inside backward.
- `offload_param.max_in_cpu` is 0: the parameters belong on NVMe, which is the point of `--offload-device nvme`
  (`max_in_cpu` elements would otherwise be moved into pinned host memory for good when the optimizer starts).
- `offload_optimizer.buffer_count` is 4: swapping a sub-group in takes one buffer per optimizer tensor (fp32 master,
  Adam's exp_avg and exp_avg_sq) plus one for its gradient (`swap_in_optimizer_state`). DeepSpeed sizes each buffer to
  the largest sub-group itself; `offload_optimizer` has no `buffer_size`.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lumina_ds.config.run import DistributedConfig, RunConfig
from lumina_ds.distributed import collectives
from lumina_ds.distributed.collectives import any_rank, broadcast_token
from lumina_ds.errors import ConfigError
from lumina_ds.models.transformer import meta_transformer

AIO_BLOCK_BYTES = 1 << 20  # DeepSpeed's MIN_AIO_BYTES: the smallest tensor it swaps
AIO_THREADS = 1  # intra_op_parallelism (DeepSpeed 0.19.8 reads this key; older docs' `thread_count` is ignored)
ALIGN_BYTES = 1024 * AIO_THREADS  # AIO_ALIGNED_BYTES x intra_op_parallelism
OPTIMIZER_SWAP_BUFFERS = 4  # fp32 master + exp_avg + exp_avg_sq + the gradient
DEEPSPEED_SUB_GROUP_SIZE = 10**9  # zero_optimization.sub_group_size when the DeepSpeed JSON leaves it out
DEEPSPEED_REUSE_DISTANCE = 10**9  # zero_optimization.stage3_max_reuse_distance likewise


def aio_section() -> dict[str, Any]:
    """DeepSpeed's `aio`: the block and thread count the buffer sizes depend on; queue depth and submission are
    DeepSpeed's defaults, written out so that ds_config.json says what ran (a DeepSpeed JSON may tune them)."""
    return {"block_size": AIO_BLOCK_BYTES, "intra_op_parallelism": AIO_THREADS, "queue_depth": 8,
            "single_submit": False, "overlap_events": True}  # fmt: skip


@dataclass(frozen=True)
class SwapShapes:
    """Per rank, in elements: what the parameter swap buffers must hold, and how many of them."""

    largest_param: int  # the largest parameter partition
    largest_sub_group: int  # a bound on the largest optimizer sub-group partition
    held: int  # swappable parameters ZeRO-3 keeps gathered at once (reuse window, shared weights)
    fetched_together: int  # the most swappable parameters one module gathers at once

    @property
    def buffer_size(self) -> int:
        return aligned(max(self.largest_param, self.largest_sub_group), ALIGN_BYTES)

    @property
    def buffer_count(self) -> int:
        return max(1, self.held + 2 * self.fetched_together)


def aligned(numel: int, unit: int) -> int:
    return -(-numel // unit) * unit


def swap_shapes(model: nn.Module, *, world_size: int, param_bytes: int, sub_group_size: int,
                reuse_distance: int) -> SwapShapes:  # fmt: skip
    """The shapes of `model` (built on the meta device: nothing allocated) as ZeRO-3 partitions them over
    `world_size` ranks, with `param_bytes` per parameter element (see the module docstring)."""
    params = list(model.parameters())  # a shared weight once
    part = {id(p): -(-p.numel() // world_size) for p in params}
    swappable = {id(p) for p in params if part[id(p)] * param_bytes >= AIO_BLOCK_BYTES}
    largest = max(part.values())
    sub_group = min(sum(part.values()), sub_group_size - 1 + largest)
    owned = [[p for p in m.parameters(recurse=False) if id(p) in swappable] for m in model.modules()]
    fetched_together = max(len(ps) for ps in owned)
    return SwapShapes(largest, sub_group, held_at_turn(model, swappable, reuse_distance), fetched_together)


def held_at_turn(model: nn.Module, swappable: set[int], reuse_distance: int) -> int:
    """Swappable parameters gathered at once where forward turns into backward: those of the modules whose reuse in
    backward is within `reuse_distance` elements of trace, plus weights that two modules share. Modules are taken in
    registration order, which is the model's forward order (models/transformer.py builds them as it calls them)."""
    held: set[int] = set()
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    after = 0  # elements of the modules after this one in forward: the trace to its reuse is twice that
    for module in reversed(list(model.modules())):
        params = list(module.parameters(recurse=False))
        if 2 * after < reuse_distance:
            held.update(id(p) for p in params if id(p) in swappable)
        after += sum(p.numel() for p in params)
    held.update(i for i, n in owners.items() if n > 1 and i in swappable)
    return len(held)


def element_bytes(precision: str) -> tuple[int, int]:
    """(bytes of a parameter element, bytes of an optimizer element): fp32 runs keep both in fp32; mixed precision
    16-bit parameters with fp32 master weights and moments; pure bf16 both in bf16."""
    if precision == "fp32":
        return 4, 4
    return 2, 2 if precision == "bf16" else 4


def nvme_sections(run: RunConfig, *, world_size: int, precision: str, nvme_path: str) -> dict[str, Any]:
    """`zero_optimization.offload_*` at `device: nvme` and `aio`, with buffers sized for this model (module docstring).
    `nvme_path` is where DeepSpeed writes: this run's swap directory (`swap_space`)."""
    dist = run.distributed
    zero = {"offload_optimizer": {"device": "nvme", "nvme_path": nvme_path, "pin_memory": True,
                                  "buffer_count": OPTIMIZER_SWAP_BUFFERS}}  # fmt: skip
    if dist.offload == "optimizer+params":
        extra = dist.deepspeed.get("zero_optimization", {})
        sub_group_size = int(extra.get("sub_group_size", DEEPSPEED_SUB_GROUP_SIZE))
        reuse_distance = int(extra.get("stage3_max_reuse_distance", DEEPSPEED_REUSE_DISTANCE))
        shapes = swap_shapes(meta_transformer(run.model), world_size=world_size,
                             param_bytes=element_bytes(precision)[0], sub_group_size=sub_group_size,
                             reuse_distance=reuse_distance)  # fmt: skip
        zero["offload_param"] = {"device": "nvme", "nvme_path": nvme_path, "pin_memory": True,
                                 "buffer_count": shapes.buffer_count, "buffer_size": shapes.buffer_size,
                                 "max_in_cpu": 0}  # fmt: skip
    return {"zero_optimization": zero, "aio": aio_section()}


# ---- the run's swap directory ---------------------------------------------------------------------------------
_ACTIVE: Path | None = None  # this process's swap directory while a run holds one (swap_space)


def swap_dir(dist: DistributedConfig) -> str:
    """Where DeepSpeed swaps: this run's directory while `swap_space` holds it; else --nvme-path itself (a DeepSpeed
    JSON shown outside a run, e.g. by `lumina-ds ds-config`)."""
    assert dist.nvme_path, "--offload-device nvme without --nvme-path passed validation"
    return str(_ACTIVE if _ACTIVE is not None else Path(dist.nvme_path).expanduser())


def nvme_problem(dist: DistributedConfig, root: Path, rank: int) -> ConfigError | None:
    """Why this rank cannot swap under `root` (E003), or None; loads DeepSpeed's AsyncIO op (see load_async_io)."""
    where = f"{socket.gethostname()}, rank {rank}"
    if not root.is_dir():
        return ConfigError("E003", f"--nvme-path {root} is not a directory on {where}",
                           "create it on a local NVMe drive of every node, at the same path")  # fmt: skip
    if dist.offload == "optimizer+params" and collectives.world_size() == 1 and accelerator_name() == "cpu":
        return ConfigError(
            "E003",
            "NVMe parameter offload needs 2 or more processes on the CPU: with one, DeepSpeed gathers each parameter "
            "in place, in its swap buffer, and reads the next parameter into that buffer while backward still "
            "needs the first (measured: wrong expert-weight gradients)",
            "start 2+ processes (e.g. deepspeed --num_gpus 2 launch/train.py ...), or use --offload optimizer",
        )
    return load_async_io(where)


def accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator

    return str(get_accelerator().device_name())


def load_async_io(where: str) -> ConfigError | None:
    """DeepSpeed's AsyncIO op, built (JIT, minutes the first time) and loaded now; E003 when libaio is missing.

    DeepSpeed checks libaio by compiling a test program with file descriptor 2 redirected through
    `sys.stderr.fileno()`; with sys.stderr captured (no descriptor) the check answers False and DeepSpeed refuses to
    load the op. Loaded here with the process's real stderr, DeepSpeed's own later load returns the loaded module.
    """
    from deepspeed.ops.op_builder import AsyncIOBuilder

    with contextlib.redirect_stderr(sys.__stderr__):
        if not AsyncIOBuilder().is_compatible():
            return ConfigError("E003", f"DeepSpeed's AsyncIO op cannot be built on {where}: libaio is missing",
                               "install libaio-dev (Debian/Ubuntu: `make system-deps`, or apt-get install "
                               "libaio-dev)")  # fmt: skip
        AsyncIOBuilder().load(verbose=False)
    return None


@contextlib.contextmanager
def swap_space(dist: DistributedConfig, *, experiment: str, rank: int) -> Iterator[Path | None]:
    """This run's swap directory `<nvme_path>/<experiment>-<token>/rank<r>` (the token drawn by rank 0 for the run),
    handed to DeepSpeed by build_ds_config while the block runs, then removed, also when the run fails. Two runs
    never share swap files: DeepSpeed empties its swap folder when an engine starts, so a shared folder would destroy
    another run's states. Collective: every rank enters it; a rank that cannot swap stops all with E003."""
    global _ACTIVE
    if dist.offload_device != "nvme":
        yield None
        return
    assert dist.nvme_path
    root = Path(dist.nvme_path).expanduser()
    problem = nvme_problem(dist, root, rank)
    if any_rank(problem is not None):
        raise problem or ConfigError("E003", "another rank cannot swap to --nvme-path", "see that rank's error")
    run_dir = root / f"{experiment}-{broadcast_token(rank)}"
    rank_dir = run_dir / f"rank{rank}"
    rank_dir.mkdir(parents=True)
    _ACTIVE = rank_dir
    try:
        with swap_in_once():
            yield rank_dir
    finally:
        _ACTIVE = None
        shutil.rmtree(rank_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # the last rank of the node to finish removes the run's directory


@contextlib.contextmanager
def swap_in_once() -> Iterator[None]:
    """DeepSpeed 0.19.8's NVMe parameter prefetch (`__prefetch_nvme_param_partitions`) lists every upcoming use of a
    parameter in its window, unlike the all-gather prefetch beside it, which skips repeats: a parameter used in forward
    and again in backward within the window is asked for twice, and the swapper stops the run with "param N already
    assigned swap buffer id M" (measured at the second step of an MoE model whose expert weights swap). Within the
    block a parameter asked for twice in one request is read once."""
    from deepspeed.runtime.swap_tensor.partitioned_param_swapper import AsyncPartitionedParameterSwapper as Swapper

    original = Swapper.swap_in

    def swap_in(self: Any, params: list[Any], async_op: bool = True, swap_in_buffers: Any = None) -> Any:
        if swap_in_buffers is None:  # given buffers pair up with the parameters one to one
            params = list({id(param): param for param in params}.values())
        return original(self, params, async_op=async_op, swap_in_buffers=swap_in_buffers)

    Swapper.swap_in = swap_in
    try:
        yield
    finally:
        Swapper.swap_in = original
