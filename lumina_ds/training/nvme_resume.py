"""What DeepSpeed 0.19.8 leaves out when it loads a checkpoint of an optimizer swapped to NVMe (ZeRO-Infinity).

`DeepSpeedEngine.load_checkpoint` skips the ZeRO optimizer files when the optimizer swaps
(`zero_nvme_offload_optimizer`) and instead copies the checkpoint's `offloaded_tensors/rank<r>/` swap files back into
the swap folder. That restores only the fp32 master weights of the sub-groups large enough to swap (>= 1 MiB).
Measured on the CPU accelerator (the code path is the same on GPUs), a resumed run then differs from the
uninterrupted one because:

- the optimizer state of the loaded engine is empty: Adam's step count restarts (wrong bias correction), and the
  moments' swap files, although copied back, are never read (the swapper reads a state tensor's file only once the
  state holds that tensor);
- the parameter groups keep the learning rate of the new engine's schedule start, not the saved step's (the scheduler
  sets it again only after the next step);
- sub-groups below 1 MiB (the norm weights' no-decay group) are never swapped: their fp32 master weights and moments
  live only in the ZeRO optimizer file, which is not read, so the norms go back to their initial values; and the
  small parameters ZeRO-3 keeps gathered (persistent) must be gathered again from the restored partitions.

`restore_swapped_optimizer` reads this rank's ZeRO optimizer file (DeepSpeed saves it in full) and puts back what is
missing, as DeepSpeed's `_rigid_load_state_dict` does for an optimizer in host memory. Swap files are named after
the parameters' ZeRO ids, a counter of the process (`deepspeed.zero.Init.param_id`): the engine must number its
parameters as the one that saved did, so every ZeRO-3 model is built with the counter from zero
(training/engine.py); a tag without files under this engine's names is E303 (`check_swap_file_names`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lumina_ds.errors import CheckpointError


def restore_swapped_optimizer(engine: Any, tag_dir: Path) -> None:
    """After `engine.load_checkpoint(tag_dir.parent, tag_dir.name)`: the groups' saved settings (learning rate), each
    sub-group's step count and moments, and the master weights of the sub-groups too small to swap, from this rank's
    ZeRO optimizer file. A no-op unless the engine's optimizer swaps to NVMe. Call it where torch.load is restricted
    to weights (it reads a checkpoint)."""
    from deepspeed import comm
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT

    optimizer = engine.optimizer
    if not getattr(optimizer, "swap_optimizer", False):
        return
    rank = comm.get_rank(group=optimizer.dp_process_group)
    saved = engine._get_all_zero_checkpoints(str(tag_dir.parent), tag_dir.name)[rank]
    check_swap_file_names(engine, tag_dir, saved[OPTIMIZER_STATE_DICT]["state"])
    for group, settings in zip(optimizer.optimizer.param_groups, saved[OPTIMIZER_STATE_DICT]["param_groups"],
                               strict=True):  # fmt: skip
        group.update({key: value for key, value in settings.items() if key != "params"})  # the saved step's lr
    for index in range(len(optimizer.fp32_partitioned_groups_flat)):
        restore_sub_group(optimizer, index, saved)
    persistent = optimizer.persistent_parameters  # small parameters ZeRO-3 keeps gathered: gathered again, restored
    if persistent:
        persistent[0].partition(persistent)
        persistent[0].all_gather(persistent)


def restore_sub_group(optimizer: Any, index: int, saved: dict[str, Any]) -> None:
    """Sub-group `index`'s optimizer state from the saved ZeRO optimizer state (states listed in sub-group order)."""
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT

    flat, state = optimizer.fp32_partitioned_groups_flat[index], saved[OPTIMIZER_STATE_DICT]["state"][index]
    if optimizer._swappable_optimizer_subgroup(index):
        restored = placeholders(state, int(optimizer.fp16_partitioned_groups_flat_numel[index]))
        live = optimizer.optimizer.state[flat]  # an engine that stepped (a rewind) has its moments bound already
        restored.update({key: value for key, value in live.items() if torch.is_tensor(value) and key in restored})
        optimizer.optimizer.state[flat] = restored
        return
    flat.data.copy_(saved[FP32_FLAT_GROUPS][index])
    optimizer.optimizer.state[flat] = {key: v.clone() if torch.is_tensor(v) else v for key, v in state.items()}
    optimizer._reassign_or_swap_out_partitioned_parameters(index)  # the 16-bit partitions from the masters


def placeholders(saved: dict[str, Any], numel: int) -> dict[str, Any]:
    """A swapped sub-group's optimizer state: the saved step count, and for each moment (saved empty) a tensor of the
    sub-group's size, which the swapper binds to the moment's swap file and fills at the next step."""
    return {k: torch.empty(numel, dtype=v.dtype) if torch.is_tensor(v) and v.dim() else v for k, v in saved.items()}


def check_swap_file_names(engine: Any, tag_dir: Path, states: dict[int, dict[str, Any]]) -> None:
    """E303 unless the tag holds a swap file, under this engine's name for it, for every swapped sub-group's master
    weights and moments: the names are ZeRO parameter ids, which DeepSpeed numbers per process."""
    from deepspeed.checkpoint.ds_to_universal import dp_index_to_str

    optimizer = engine.optimizer
    rank = engine.local_rank if engine.use_node_local_storage() else engine.global_rank
    folder = tag_dir / "offloaded_tensors" / f"rank{dp_index_to_str(rank)}"  # where DeepSpeed copied them from
    expected = []
    for index, flat in enumerate(optimizer.fp32_partitioned_groups_flat):
        if optimizer._swappable_optimizer_subgroup(index):
            moments = [key for key, value in states[index].items() if torch.is_tensor(value) and value.dim()]
            expected += [f"{flat.ds_id}.tensor.swp"] + [f"{key}-{flat.ds_id}.tensor.swp" for key in moments]
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(
            "E303",
            f"checkpoint {tag_dir.name} has no swap files {', '.join(missing[:3])} in {folder}: its optimizer states "
            "were swapped under other parameter numbers than this engine's",
            "resume with the model, ZeRO stage and offload the checkpoint was saved with",
        )
