"""`lumina-ds train` (and `launch/train.py`, which is the same command): how its flags (cli/train_flags.py) become the
one resolved RunConfig every launcher trains with."""

from __future__ import annotations

import argparse
import os
from typing import Any

from lumina_ds.cli.luminaai import config_file_given_as_preset
from lumina_ds.cli.plan import add_headroom_arg, headroom_of
from lumina_ds.cli.train_flags import FLAG_FIELDS, add_train_arguments
from lumina_ds.config.io import deep_merge, load_config
from lumina_ds.config.presets import DEFAULT_PRESET, PRESETS, get_preset
from lumina_ds.config.run import RunConfig, without_owned_keys
from lumina_ds.errors import ConfigError


def _set(run: RunConfig, section: str, name: str, value: Any) -> None:
    target: Any = run
    for part in section.split("."):
        target = getattr(target, part)
    setattr(target, name, value)


def explicit_flags(args: argparse.Namespace) -> set[str]:
    """The dests of the training flags given on the command line."""
    return {dest for dest in FLAG_FIELDS if getattr(args, dest, None) is not None}


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """Preset (E001 when unknown) or YAML file first, then every flag that was given on top (not yet validated:
    resolve_run validates the finished config once)."""
    if config_file_given_as_preset(args.preset):
        raise ConfigError(
            "E002",
            f"--config {args.preset}: --config names a preset here ({', '.join(PRESETS)})",
            f"LuminaAI's --config FILE.yaml is --config-file {args.preset}",
        )
    run = load_config(args.config_file) if args.config_file else get_preset(args.preset or DEFAULT_PRESET)
    if {"activation_checkpointing", "gradient_checkpointing"} <= explicit_flags(args):
        raise ConfigError("E002", "--gradient-checkpointing and --activation-checkpointing both given",
                          "--gradient-checkpointing is --activation-checkpointing full; give one")  # fmt: skip
    for dest in explicit_flags(args):
        section, name = FLAG_FIELDS[dest]
        _set(run, section, name, getattr(args, dest))
    return run


def resolve_run(
    args: argparse.Namespace, *, world_size: int, announce: bool = True, local_rank: int = 0, ranks_per_node: int = 1
) -> RunConfig:
    """The run config every launcher trains with for these flags on `world_size` processes: resolved, validated
    once, its input paths checked, and frozen (a later change is lumina_ds.config.changes.revise).

    Flags over the preset or YAML; the --deepspeed-config keys; the preset's planned layout for the fields no flag
    set; --auto-batch-size on this rank's GPU; MFU's peak; then every rule on the config alone (E002) and every input
    path (E104), before anything is built.
    """
    from lumina_ds.data import check_input_files
    from lumina_ds.distributed.ds_config import check_deepspeed_file, load_deepspeed_json

    run = run_config_from_args(args)
    if run.checkpoint.init_from:
        adopt_init_source(run, explicit_flags(args), announce=announce)
    if run.distributed.deepspeed_config:
        user = load_deepspeed_json(run.distributed.deepspeed_config)
        # its keys over the layout's; the ones the run config owns are compared with the resolved run below
        run.distributed.deepspeed = deep_merge(run.distributed.deepspeed, without_owned_keys(user))
    planned_for = None
    if not args.config_file and not run.checkpoint.init_from:
        planned_for = _adopt_preset_layout(run, explicit_flags(args), world_size=world_size, announce=announce)
    if run.train.auto_batch_size:
        line = size_micro_batch(run, world_size=world_size, ranks_per_node=ranks_per_node, local_rank=local_rank)
        if announce:
            print(line, flush=True)
    if not args.skip_memory_check:
        model_path = run.checkpoint.init_from if not args.config_file else None  # planned as `plan --model` plans it
        gate_launch(run, explicit_flags(args), planned_for=planned_for, world_size=world_size,
                    ranks_per_node=ranks_per_node, local_rank=local_rank, announce=announce,
                    headroom=headroom_of(args), model_path=model_path)  # fmt: skip
    resolve_peak_tflops(run, local_rank=local_rank)
    run.validate()
    notes = check_deepspeed_file(run, world_size=world_size)  # E002 when it changes what the flags decide
    if announce and notes:
        print("\n".join(notes), flush=True)
    check_input_files(run.data)
    run.freeze()
    return run


ARCHITECTURE_FLAGS = ("num_experts", "top_k", "init_scheme")  # from the source; loss weights and backends may change


def adopt_init_source(run: RunConfig, explicit: set[str], *, announce: bool) -> None:
    """--init-from: the model (and, unless --tokenizer is given, the tokenizer) come from the source; a flag that
    would change the architecture is E002."""
    from lumina_ds.hf.source import check_tokenizer_fits, open_model_source
    from lumina_ds.training.tag_weights import ensure_weights

    assert run.checkpoint.init_from is not None
    changed = sorted(f"--{d.replace('_', '-')}" for d in explicit if d in ARCHITECTURE_FLAGS)
    if changed:
        raise ConfigError("E002", f"{', '.join(changed)} cannot change a model given by --init-from",
                          "the architecture comes from the source; drop the flag")  # fmt: skip
    source = open_model_source(ensure_weights(run.checkpoint.init_from, log=print if announce else lambda _: None))
    if announce and source.warning:
        print(source.warning, flush=True)
    flags_set = {name: getattr(run.model.moe, name) for name in ("capacity_factor", "load_balancing_weight",
                 "router_z_loss_weight") if name in explicit}  # fmt: skip
    backend = run.model.attention_backend if "attention_backend" in explicit else None
    run.model = source.model
    for name, value in flags_set.items():
        setattr(run.model.moe, name, value)
    if backend is not None:
        run.model.attention_backend = backend
    run.model_source = str(source.path)
    if not run.data.tokenizer and source.tokenizer_file is not None:
        run.data.tokenizer = str(source.tokenizer_file)
    if run.data.tokenizer:
        check_tokenizer_fits(run.data.tokenizer, run.model)
    if announce:
        print(f"--init-from {source.path} ({source.kind}): the model and tokenizer come from it; no preset layout")


def _adopt_preset_layout(run: RunConfig, explicit: set[str], *, world_size: int, announce: bool) -> str | None:
    """Adopt the preset's planned layout; returns the cluster it was planned for (None: the preset has none)."""
    from lumina_ds.planning.layouts import LAYOUTS_DIR, METADATA_KEY, adopt_layout, load_layout

    layout = load_layout(run.preset)
    if layout is None:
        return None
    notes = adopt_layout(run, layout, world_size=world_size, explicit=explicit)
    if announce:
        print(f"planned layout: {LAYOUTS_DIR / (run.preset + '.json')} (flags given on the command line win)")
        for note in notes:
            print(f"  {note}")
    return str(layout[METADATA_KEY]["cluster"])


def gate_launch(run: RunConfig, explicit: set[str], *, planned_for: str | None, world_size: int, ranks_per_node: int,
                local_rank: int, announce: bool, headroom: float, model_path: str | None = None) -> None:  # fmt: skip
    """The launch-time plan (planning/launch_gate.py): the run as resolved against the machine it starts on, before
    any tokenizer, data or model work; a re-plan is printed, nothing fitting is E201/E202. With `model_path` (an
    --init-from run, which has no preset layout) the layout is planned for this machine as `plan --model` plans it
    (planning/model_launch.py)."""
    from lumina_ds.distributed.ds_config import select_precision
    from lumina_ds.planning.launch_gate import check_launch, this_machine
    from lumina_ds.planning.model_launch import plan_model_at_launch

    machine = this_machine(world_size=world_size, ranks_per_node=ranks_per_node, local_rank=local_rank,
                           headroom=headroom, nvme_path=run.distributed.nvme_path)  # fmt: skip
    precision = select_precision(run.train.precision)  # E003 here rather than after the data work
    if "gradient_checkpointing" in explicit:
        explicit = explicit | {"activation_checkpointing"}
    if model_path is not None:
        if run.train.auto_batch_size:  # --auto-batch-size sized the micro-batch for this GPU: the plan keeps it
            explicit = explicit | {"micro_batch_size", "grad_accum"}
        line = plan_model_at_launch(run, machine, precision=precision, explicit=explicit, name=model_path)
    else:
        line = check_launch(run, machine, precision=precision, explicit=explicit, planned_for=planned_for)
    if line and announce:
        print(line, flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    from lumina_ds.distributed.launchers import detect_launch
    from lumina_ds.training.session import profile_data_loading, train

    if args.profile_data_loading:
        profile_data_loading(resolve_run(args, world_size=1), batches=args.profile_data_loading)
        return 0
    launch = detect_launch(os.environ)  # this rank's place in the job, read without starting anything
    run = resolve_run(args, world_size=launch.world_size, announce=launch.rank == 0, local_rank=launch.local_rank,
                      ranks_per_node=launch.local_world_size)  # fmt: skip
    if launch.rank == 0:
        warn_if_checkpoints_outgrow_disk(run)
    code = int(train(run, force_unlock=args.force_unlock).get("exit_code", 0))
    if run.logging.test_generation and launch.rank == 0 and code == 0:  # a signal-stopped run leaves at once
        from lumina_ds.cli.generate import generation_check

        generation_check(str(run.logging.run_dir))
    return code


def resolve_peak_tflops(run: RunConfig, *, local_rank: int) -> None:
    """MFU's denominator: --peak-tflops, else this GPU's dense bf16 peak from the one table of GPUs (the resolved
    value is saved in config.yaml); none on a CPU or an unknown GPU, where MFU is logged as null."""
    import torch

    from lumina_ds.planning.hardware import dense_peak_tflops

    if run.logging.peak_tflops is None and torch.cuda.is_available():
        device = local_rank % torch.cuda.device_count()
        run.logging.peak_tflops = dense_peak_tflops(torch.cuda.get_device_name(device))


def size_micro_batch(run: RunConfig, *, world_size: int, ranks_per_node: int, local_rank: int) -> str:
    """--auto-batch-size: set the largest micro-batch the memory model fits on this rank's GPU (all GPUs of a job are
    taken to be alike); a line saying what was picked, or why nothing changed."""
    import torch

    from lumina_ds.distributed.ds_config import select_precision
    from lumina_ds.planning.auto_batch import pick_micro_batch

    if not torch.cuda.is_available():
        return f"--auto-batch-size: no GPU here, micro-batch {run.train.micro_batch_size} kept (it sizes GPU memory)"
    device_bytes = torch.cuda.get_device_properties(local_rank % torch.cuda.device_count()).total_memory
    target = run.train.target_memory_usage
    pick = pick_micro_batch(run, device_bytes=device_bytes, target=target, world_size=world_size,
                            ranks_per_node=ranks_per_node, precision=select_precision(run.train.precision))  # fmt: skip
    run.train.micro_batch_size, run.train.grad_accum = pick.micro_batch_size, pick.grad_accum
    return pick.describe(device_bytes, target)


def warn_if_checkpoints_outgrow_disk(run: RunConfig) -> None:
    """The tags --save-total-limit keeps, against the free space of the output directory (a warning: space may be
    freed, or the run may end before the limit is reached)."""
    import shutil
    import sys

    from lumina_ds.distributed.ds_config import select_precision
    from lumina_ds.planning.environment import existing_parent
    from lumina_ds.planning.memory import checkpoint_tag_bytes
    from lumina_ds.planning.memory_inputs import GIB, ParamInventory

    tag = checkpoint_tag_bytes(ParamInventory.of(run.model), precision=select_precision(run.train.precision),
                               zero_stage=run.distributed.zero_stage)  # fmt: skip
    kept = tag * run.checkpoint.save_total_limit
    free = shutil.disk_usage(existing_parent(run.logging.run_dir)).free

    def size(n: float) -> str:
        return f"{n / GIB:,.1f} GB" if n >= GIB / 10 else f"{n / 2**20:,.1f} MB"

    if kept > free:
        print(
            f"warning: each checkpoint takes about {size(tag)} and --save-total-limit "
            f"{run.checkpoint.save_total_limit} keeps {size(kept)}, but {run.logging.output_dir} has "
            f"{size(free)} free: a save will fail with E303 unless space is freed or the limit lowered",
            file=sys.stderr,
            flush=True,
        )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (the same command as `launch/train.py` under deepspeed, torchrun, mpirun or srun)",
        description="Train a model. Every flag's default is shown; flags override the preset or --config-file.",
    )
    add_train_arguments(p)
    p.add_argument("--profile-data-loading", type=int, nargs="?", const=200, default=0, metavar="BATCHES",
                   help="time the data pipeline for BATCHES micro-batches (200 when no number is given) without a "
                   "model, then exit (default: off)")  # fmt: skip
    add_headroom_arg(p)
    p.add_argument("--skip-memory-check", action="store_true",
                   help="start without the launch-time memory check (the run as resolved against this machine's GPU "
                   "and host memory, with plan's memory model), e.g. where the model is known to overestimate "
                   "(default: off)")  # fmt: skip
    # an action on this start only, not a setting of the run: it is not part of the run config (nor config.yaml)
    p.add_argument("--force-unlock", action="store_true",
                   help="break the run directory's lock (.run.lock) and take it, with a warning naming its holder, "
                   "without waiting for its 5-minute lease to expire: only once that run is known to be dead (default: "
                   "off)")  # fmt: skip
    p.set_defaults(func=cmd_train)
