"""DeepSpeed's universal conversion split across the ranks of the resuming run: each rank converts its share of the
parameters, with DeepSpeed's own functions from `deepspeed.checkpoint.ds_to_universal`.

`python -m lumina_ds.training.universal_split --input TAG --output OUT --rank R --world W` converts rank R's share;
after every rank's share, `--finish` (one process) writes what belongs to no parameter. Each call lists the files it
wrote, with their checksums, in `<OUT>/../digests.<part>.json` (training/universal.py builds the marker from them).

Why parameters and not files: a parameter's state lies in every saved rank's optimizer file, so a split by files
would need every rank's fragments on disk before any parameter could be merged (a barrier, and the temporary copy
of the whole optimizer state at once). Split by parameters, a rank extracts its parameters' fragments from every
file, merges each and removes its fragments at once: no barrier between the phases, and the temporary folder holds
one rank's unmerged share at most. Every file is loaded with `mmap=True`, so a rank reads the pages of its own
parameters' fragments and the pickle, not the whole file (the W ranks together read the tag about once).

Everything is loaded weights-only (training/checkpoint_files.py: a tampered pickle is refused, not run). Layouts
this split does not cover (tensor or pipeline parallelism, which lumina-ds does not train) exit with UNSPLITTABLE.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import itertools
import json
import math
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import torch

from lumina_ds.training.checkpoint_files import file_digest, weights_only_loads

UNSPLITTABLE = 3  # exit status: the layout needs DeepSpeed's single-process converter


@dataclass(frozen=True)
class Share:
    """What one rank converted: its parameters, the model files it wrote, the merge patterns none of its
    parameters matched (DeepSpeed's strict check takes the intersection over all parameters)."""

    params: set[str]
    files: list[str]
    unmatched: list[str] | None


class UnsplittableError(Exception):
    """A checkpoint layout the split conversion does not cover."""


def shares(sizes: dict[str, int], world: int) -> list[set[str]]:
    """Parameters dealt to `world` ranks in contiguous runs of the saved order (`sizes` in that order), of about
    equal size (each goes to the rank whose run holds its middle). Contiguous because a parameter's fragments lie in
    that order in every file: a rank's pages then lie together, and what the disk reads ahead around one fragment
    (8 MB on the test machine) is mostly the rank's own next one, not another rank's."""
    total, done, dealt = sum(sizes.values()), 0, [set[str]() for _ in range(world)]
    for name, size in sizes.items():
        dealt[min(world - 1, int((done + size / 2) * world // total)) if total else 0].add(name)
        done += size
    return dealt


def _numel(shape: Any) -> int:
    return int(shape.numel()) if hasattr(shape, "numel") else math.prod(shape)


def _dtu() -> ModuleType:
    from deepspeed.checkpoint import ds_to_universal

    return ds_to_universal


def _args(output: str) -> SimpleNamespace:
    """What DeepSpeed's helpers read from its command line: one worker (the ranks are the parallelism), strict."""
    return SimpleNamespace(
        output_folder=output,
        num_extract_workers=1,
        num_merge_workers=1,
        strict=True,
        keep_temp_folder=False,
        inject_missing_state=True,
    )


@contextlib.contextmanager
def _dumping_only(dtu: ModuleType, names: set[str]) -> Iterator[None]:
    """DeepSpeed's ZeRO-1/2 extraction dumps every parameter of a file; only this rank's are written."""
    original = getattr(dtu, "dump_param_fragment")  # noqa: B009

    def dump(directory: str, tp: int, dp: int, state: str, flat: Any, name: str, offset: int, numel: int) -> None:
        if name in names:
            original(directory, tp, dp, state, flat, name, offset, numel)

    setattr(dtu, "dump_param_fragment", dump)  # noqa: B010  (the module global its extraction calls)
    try:
        yield
    finally:
        setattr(dtu, "dump_param_fragment", original)  # noqa: B010


@contextlib.contextmanager
def _experts_only(dtu: ModuleType, names: set[str]) -> Iterator[None]:
    """DeepSpeed's ZeRO-3 AutoEP consolidation takes every expert weight it finds in the metadata; only this rank's
    are kept (the same function lists them for the validation, which a subset passes)."""
    original = getattr(dtu, "_autoep_expert_param_info")  # noqa: B009

    def info(metadata: Any) -> dict[str, Any]:
        return {k: v for k, v in original(metadata).items() if k in names}

    setattr(dtu, "_autoep_expert_param_info", info)  # noqa: B010  (the module global its consolidation calls)
    try:
        yield
    finally:
        setattr(dtu, "_autoep_expert_param_info", original)  # noqa: B010


def _remove_fragments(temp: str, names: Iterable[str]) -> None:
    for name in names:
        shutil.rmtree(os.path.join(temp, name), ignore_errors=True)


# ---- ZeRO-1/2 -----------------------------------------------------------------------------------------------------
def _zero12_checkpoint(dtu: ModuleType, input_folder: str) -> Any:
    """DeepSpeed's view of the tag, its universal info injected as `--inject_missing_state` does."""
    from deepspeed.checkpoint import DeepSpeedCheckpoint

    ds = DeepSpeedCheckpoint(input_folder)
    dtu._inject_missing_state(ds)
    dtu._check_for_required_state(ds)
    if ds.tp_degree != 1 or ds.pp_degree != 1:
        raise UnsplittableError(f"tensor parallel {ds.tp_degree}, pipeline parallel {ds.pp_degree}")
    return ds


def _zero12_layout(dtu: ModuleType, ds: Any, input_folder: str) -> tuple[dict[str, Any], dict[str, Any], Any, bool]:
    """(per-tp shapes by parameter, AutoEP expert info by parameter, AutoEP metadata, data-before-expert order)."""
    from deepspeed.checkpoint.autoep_universal import get_autoep_zero12_expert_param_info

    by_tp, metadata, before = dtu._aggregate_autoep_zero12_metadata(ds.model_state_metadata)
    shapes = dtu._group_per_tp_shapes(by_tp, ds.pp_degree, ds.tp_degree)
    expert_files = glob.glob(os.path.join(input_folder, "layer_*_expert_*_model_states.pt"))
    kind = dtu._classify_autoep_expert_file_consolidation(metadata, expert_files)
    experts = get_autoep_zero12_expert_param_info(metadata) if kind == "autoep" else {}
    return shapes, experts, metadata, before


def _zero12_share(dtu: ModuleType, input_folder: str, output: str, rank: int, world: int) -> Share:
    """Extract, merge and (AutoEP) consolidate this rank's parameters."""
    ds = _zero12_checkpoint(dtu, input_folder)
    shapes, experts, metadata, before = _zero12_layout(dtu, ds, input_folder)
    # the saved order (the first model file's, group by group), not `shapes`, whose names come from a set
    saved = ds.model_state_metadata[0][1][dtu.PARAM_SHAPES]
    mine = shares({name: _numel(shapes[name][0]) for name in saved}, world)[rank]
    temp, zero = os.path.join(output, "tmp"), os.path.join(output, "zero")
    # the fragments are addressed by offset: the tail padding need not be cut off (which copies the whole group)
    ds.get_zero_checkpoint_state = functools.partial(ds.get_zero_checkpoint_state, strip_tensor_paddings=False)
    with _dumping_only(dtu, mine):
        for index in itertools.product(range(ds.pp_degree), range(ds.tp_degree), range(ds.dp_degree)):
            dtu.extract_zero_shards(temp, ds, index)
    info = ds.get_checkpoint_info(dtu.UNIVERSAL_CHECKPOINT_INFO)
    unmatched = None
    for name in sorted(mine - set(experts)):
        left = set(dtu.merge_tp_slices(info, zero, temp, ds.tp_degree, (name, shapes[name])))
        unmatched = left if unmatched is None else unmatched & left
        _remove_fragments(temp, [name])
    _zero12_experts(ds, input_folder, output, {n: experts[n] for n in sorted(mine & set(experts))}, metadata, before)
    return Share(mine, [], sorted(unmatched) if unmatched is not None else None)


def _zero12_experts(
    ds: Any, input_folder: str, output: str, experts: dict[str, Any], metadata: Any, before: bool
) -> None:
    """DeepSpeed's steps 2.5 and 2.6 (ds_to_universal.main) for this rank's AutoEP expert weights."""
    from deepspeed.checkpoint import autoep_universal as autoep

    if not experts:
        return
    temp, dtu = os.path.join(output, "tmp"), _dtu()
    by_tp, _, _ = dtu._aggregate_autoep_zero12_metadata(ds.model_state_metadata)
    shapes = {name: per_tp[0] for name, per_tp in dtu._group_per_tp_shapes(by_tp, 1, 1).items()}
    fallback = autoep.get_autoep_zero12_fp32_fallback_param_names(temp, experts, shapes, ds.dp_degree, before)
    if fallback:
        autoep.consolidate_autoep_expert_files(
            input_folder, output, metadata, fp32_fallback_param_names=fallback, fp32_fallback_dir=temp
        )
    for name, info in experts.items():
        autoep.consolidate_autoep_zero12_expert_states(
            temp, output, {name: info}, shapes, ds.dp_degree, ds.tp_degree, before, fp32_fallback_dir=temp
        )
        _remove_fragments(temp, [name])


def _zero12_finish(dtu: ModuleType, input_folder: str, output: str) -> None:
    """What DeepSpeed's main writes once all parameters are merged: the fp32 weights of parameters without optimizer
    fragments, the common optimizer state and the model-states files (AutoEP's metadata added)."""
    ds = _zero12_checkpoint(dtu, input_folder)
    _, _, metadata, _ = _zero12_layout(dtu, ds, input_folder)
    zero = os.path.join(output, "zero")
    for model_file in ds.mp_rank_files:
        module = torch.load(model_file, map_location="cpu").get("module") or {}
        for name, tensor in module.items():
            fp32 = os.path.join(zero, name, "fp32.pt")
            if not os.path.isfile(fp32):
                os.makedirs(os.path.dirname(fp32), exist_ok=True)
                torch.save({dtu.PARAM: tensor.float()}, fp32)
    dtu._save_optimizer_state(_args(output), ds)
    for model_file in ds.mp_rank_files:
        if metadata is None:
            shutil.copy2(model_file, output)
            continue
        state = torch.load(model_file, map_location="cpu")
        info = state.setdefault(dtu.UNIVERSAL_CHECKPOINT_INFO, {})
        info[dtu.EXPERT_PARAMETER_PATTERNS] = [r"\.experts\.w[123]$"]
        info[dtu.AUTOEP_LAYERS_KEY] = metadata
        torch.save(state, os.path.join(output, os.path.basename(model_file)))


# ---- ZeRO-3 -------------------------------------------------------------------------------------------------------
def _zero3_layout(dtu: ModuleType, input_folder: str) -> dict[str, Any]:
    """The files and shapes of a ZeRO-3 tag, with DeepSpeed's own checks (ds_to_universal.main's stage-3 branch)."""
    optim_files = dtu._filter_zero3_optim_files(dtu._get_optim_files(input_folder))
    model_files = dtu._get_zero3_model_state_files(input_folder)
    experts, by_rank = dtu._autoep_expert_param_names_by_rank(model_files)
    metadata = any(m is not None for m in by_rank.values())
    partitioned = any(dtu._uses_zero3_partitioned_autoep_metadata(m) for m in by_rank.values())
    if metadata and not partitioned:
        raise NotImplementedError("Stage 3 universal checkpoint conversion for AutoEP requires the partition-native")
    if partitioned:
        dtu._validate_zero3_model_optim_rank_sets(model_files, optim_files)
    _, tp, dp = dtu._build_zero3_rank_grid(model_files)
    optim_grid, tp_optim, dp_optim = dtu._build_zero3_rank_grid(optim_files)
    if (tp, dp) != (tp_optim, dp_optim):
        raise RuntimeError(f"ZeRO-3 model/optimizer degrees differ: {(tp, dp)} != {(tp_optim, dp_optim)}")
    if tp != 1:
        raise UnsplittableError(f"tensor parallel {tp}")
    shapes = dtu._parse_model_states_stage3(model_files)
    return {
        "optim_files": optim_files, "model_files": model_files, "optim_grid": optim_grid, "dp": dp,
        "experts": experts if partitioned else set(), "partitioned": partitioned, "shapes": shapes,
    }  # fmt: skip


def _zero3_share(dtu: ModuleType, input_folder: str, output: str, rank: int, world: int) -> Share:
    """Extract and merge this rank's parameters (AutoEP experts consolidated), and its share of the model files."""
    tag = _zero3_layout(dtu, input_folder)
    sizes = {name: _numel(shape) for group in tag["shapes"] for name, shape in group.items()}
    mine, experts = shares(sizes, world)[rank], tag["experts"]
    temp = os.path.join(output, "tmp")
    for dp in range(tag["dp"]):
        dtu.extract_zero_shards_stage3(
            tag["optim_grid"],
            [tag["shapes"]],
            tag["dp"],
            temp,
            (0, dp),
            exclude_param_names=experts | (sizes.keys() - mine),
        )
    for name in sorted(mine - experts):
        dtu.merge_zero3_slices(tag["dp"], os.path.join(output, "zero"), temp, name)
        _remove_fragments(temp, [name])
    if tag["partitioned"] and mine & experts:
        with _experts_only(dtu, mine & experts):
            dtu._consolidate_zero3_autoep_expert_states(output, tag["model_files"], tag["optim_files"])
    files = [f for i, f in enumerate(tag["model_files"]) if i % world == rank]
    for model_file in files:
        _copy_zero3_model_file(dtu, model_file, output, autoep=tag["partitioned"])
    return Share(mine, [os.path.basename(f) for f in files], None)  # no merge patterns without tensor parallelism


def _copy_zero3_model_file(dtu: ModuleType, model_file: str, output: str, *, autoep: bool) -> None:
    """As ds_to_universal.main copies it: AutoEP's layer metadata added to its universal info."""
    if not autoep:
        shutil.copy2(model_file, output)
        return
    state = torch.load(model_file, map_location="cpu")
    info = state.setdefault(dtu.UNIVERSAL_CHECKPOINT_INFO, {})
    info[dtu.EXPERT_PARAMETER_PATTERNS] = [r".*\.experts\.w[123]$"]
    info[dtu.AUTOEP_LAYERS_KEY] = dtu._get_autoep_metadata(state)
    torch.save(state, os.path.join(output, os.path.basename(model_file)))


def _zero3_finish(dtu: ModuleType, input_folder: str, output: str) -> None:
    dtu._save_optimizer_state_stage3(_args(output), dtu._filter_zero3_optim_files(dtu._get_optim_files(input_folder)))


# ---- entry --------------------------------------------------------------------------------------------------------
def zero_stage(dtu: ModuleType, input_folder: str) -> int:
    """The tag's ZeRO stage, found as ds_to_universal.main finds it."""
    optim_files = dtu._get_optim_files(input_folder)
    return int(dtu._get_zero_stage(dtu._filter_zero3_optim_files(optim_files) or optim_files))


def _listed(out: Path, files: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """{path relative to `out`: size, xxh3}."""
    return {str(p.relative_to(out)): {"size": p.stat().st_size, "xxh3": file_digest(p)} for p in sorted(files)}


def run(input_folder: str, output: str, *, rank: int, world: int, finish: bool) -> dict[str, Any]:
    """One rank's share (or the finish): the files it wrote with their checksums, and the merge patterns its
    parameters left unmatched (None: it merged nothing that has patterns)."""
    dtu = _dtu()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    stage = zero_stage(dtu, input_folder)
    if finish:
        before = {p for p in out.rglob("*") if p.is_file()}
        (_zero3_finish if stage == 3 else _zero12_finish)(dtu, input_folder, output)
        shutil.rmtree(out / "tmp", ignore_errors=True)  # each rank removed its own fragments; the folders remain
        return {
            "files": _listed(out, (p for p in out.rglob("*") if p.is_file() and p not in before)),
            "unmatched": None,
            "rank": None,
        }
    share = (_zero3_share if stage == 3 else _zero12_share)(dtu, input_folder, output, rank, world)
    # the ranks write into one folder at once: each lists its own parameters' folders and model files
    mine = [p for name in share.params if (out / "zero" / name).is_dir() for p in (out / "zero" / name).rglob("*")]
    mine += [out / name for name in share.files]
    listed = _listed(out, (p for p in mine if p.is_file()))
    return {"files": listed, "unmatched": share.unmatched, "rank": rank, "world": world}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m lumina_ds.training.universal_split")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--finish", action="store_true")
    args = parser.parse_args(argv)
    part = "finish" if args.finish else f"share.{args.rank}"
    with weights_only_loads(), _mmap_loads():
        try:
            result = run(args.input, args.output, rank=args.rank, world=args.world, finish=args.finish)
        except UnsplittableError as exc:
            print(f"unsplittable: {exc}", file=sys.stderr)
            return UNSPLITTABLE
    (Path(args.output).parent / f"digests.{part}.json").write_text(json.dumps(result))
    return 0


@contextlib.contextmanager
def _mmap_loads() -> Iterator[None]:
    """Every torch.load maps its file: the pages of tensors nobody touches are never read."""
    inner = torch.load
    torch.load = functools.partial(inner, mmap=True)
    try:
        yield
    finally:
        torch.load = inner


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
