"""`lumina-ds train` (and `launch/train.py`, which is the same command): its flags, and how flags become the one
resolved RunConfig every launcher trains with."""

from __future__ import annotations

import argparse
import functools
import os
from dataclasses import dataclass, field
from typing import Any

from lumina_ds.cli.luminaai import config_file_given_as_preset
from lumina_ds.config.io import deep_merge, load_config
from lumina_ds.config.model import ATTENTION_BACKENDS, INIT_SCHEMES
from lumina_ds.config.presets import PRESETS, get_preset
from lumina_ds.config.run import (
    ACTIVATION_CHECKPOINTING,
    DATA_FORMATS,
    DATA_STRATEGIES,
    OFFLOAD_MODES,
    PRECISIONS,
    SCHEDULERS,
    RunConfig,
)
from lumina_ds.errors import ConfigError


@dataclass(frozen=True)
class Flag:
    """One training flag: its spellings, the RunConfig field it sets (`section.field`), help and argparse options."""

    names: tuple[str, ...]
    target: str
    help: str
    options: dict[str, Any] = field(default_factory=dict)
    default: str | None = None  # how to describe the default when the field's value does not say it

    @property
    def dest(self) -> str:
        return self.options.get("dest") or self.names[0].lstrip("-").replace("-", "_")


BOOL = {"action": argparse.BooleanOptionalAction}
ON = {"action": "store_true", "default": None}
DATA_FLAGS = [
    Flag(
        ("--train-data",),
        "data.train_data",
        "data sources: SOURCE[,SOURCE2:WEIGHT,...] (weight = uses per epoch); a source is a .jsonl, .jsonl.gz, .json "
        "or .parquet file, a datasets save_to_disk dir (DIR[@SPLIT]) or hf://NAME[:CONFIG][@SPLIT]",
    ),
    Flag(("--eval-data",), "data.eval_data", "a data source to evaluate on (any kind --train-data takes)"),
    Flag(
        ("--data-format",),
        "data.data_format",
        "record format of every source: messages, sharegpt, alpaca, prompt-completion (auto: detected per source)",
        {"choices": DATA_FORMATS},
    ),
    Flag(
        ("--data-fields",),
        "data.data_fields",
        "the data's names for renamed fields, OURS=THEIRS,... (e.g. instruction=question,output=answer)",
        default="none",
    ),
    Flag(("--tokenizer",), "data.tokenizer", "a tokenizer.json", default="a byte-level BPE trained on the data"),
    Flag(("--seq-len",), "data.seq_len", "packed row length in tokens", {"type": int}, "min(context, 4096)"),
    Flag(("--train-on",), "data.train_on", "which tokens carry loss", {"choices": ("assistant", "all")}),
    Flag(
        ("--data-strategy", "--train-data-strategy"),
        "data.strategy",
        "memory: tokenize into RAM; sharded: memory-mapped token shards; streaming: tokenize on the fly "
        "(auto: < 500 MB memory, < 10 GB sharded, else streaming)",
        {"choices": DATA_STRATEGIES},
    ),
    Flag(("--num-workers",), "data.num_workers", "tokenizing processes / streaming loader workers", {"type": int}),
    Flag(("--prefetch-factor",), "data.prefetch_factor", "micro-batches each streaming worker holds", {"type": int}),
    Flag(("--shard-size-mb",), "data.shard_size_mb", "JSONL megabytes per prepared shard", {"type": int}),
    Flag(("--prepared-dir",), "data.prepared_dir", "prepared-shard cache", default="<output-dir>/prepared"),
    Flag(("--strict",), "data.strict", "stop at the first malformed line (E101-E103) instead of skipping it", ON),
    Flag(
        ("--max-line-bytes",),
        "data.max_line_bytes",
        "a JSONL line longer than this is skipped (E111) without being read into memory",
        {"type": int},
    ),
    Flag(("--truncate-long",), "data.truncate_long", "cut longer lines' message contents to fit instead (W106)", ON),
]
OPTIM_FLAGS = [
    Flag(("--epochs",), "train.epochs", "passes over the training data", {"type": int}),
    Flag(("--max-steps",), "train.max_steps", "optimizer steps (overrides --epochs)", {"type": int}, "epochs decide"),
    Flag(
        ("--micro-batch-size", "--batch-size"), "train.micro_batch_size", "rows per GPU per micro-batch", {"type": int}
    ),
    Flag(("--grad-accum",), "train.grad_accum", "micro-batches per optimizer step", {"type": int}),
    Flag(("--learning-rate", "--lr"), "train.learning_rate", "peak learning rate", {"type": float}),
    Flag(("--min-lr",), "train.min_lr", "learning rate the schedule decays to", {"type": float}),
    Flag(("--warmup-ratio",), "train.warmup_ratio", "share of the steps spent warming up", {"type": float}),
    Flag(
        ("--warmup-steps",),
        "train.warmup_steps",
        "warm-up steps (overrides --warmup-ratio)",
        {"type": int},
        "--warmup-ratio decides",
    ),
    Flag(("--lr-scheduler",), "train.lr_scheduler", "decay after the warm-up", {"choices": SCHEDULERS}),
    Flag(("--optimizer",), "train.optimizer", "optimizer (AdamW, no weight decay on norms)", {"choices": ("adamw",)}),
    Flag(("--weight-decay",), "train.weight_decay", "AdamW weight decay", {"type": float}),
    Flag(("--max-grad-norm",), "train.max_grad_norm", "gradient clipping norm (0 disables)", {"type": float}),
    Flag(("--beta1",), "train.beta1", "AdamW beta1", {"type": float}),
    Flag(("--beta2",), "train.beta2", "AdamW beta2", {"type": float}),
    Flag(("--eps",), "train.eps", "AdamW epsilon", {"type": float}),
    Flag(("--seed",), "train.seed", "initial weights and data order", {"type": int}),
    Flag(
        ("--precision",),
        "train.precision",
        "auto = mixed_bf16 on bf16 GPUs, mixed_fp16 on older GPUs, fp32 on CPU",
        {"choices": PRECISIONS},
    ),
    Flag(
        ("--activation-checkpointing",),
        "train.activation_checkpointing",
        "what backward recomputes: full (every block), selective (= attention: each block's attention sub-block), "
        "moe (each block's MoE/FFN sub-block) or none",
        {"choices": ACTIVATION_CHECKPOINTING},
    ),
    Flag(("--gradient-checkpointing",), "train.gradient_checkpointing", "= --activation-checkpointing full/none", BOOL),
    Flag(("--compile",), "train.compile", "torch.compile each block's attention and norms (MoE stays eager)", BOOL),
    Flag(
        ("--early-stopping-patience",),
        "train.early_stopping_patience",
        "evaluations without improvement before stopping",
        {"type": int},
        "off",
    ),
    Flag(
        ("--divergence-guard",),
        "train.guard.enabled",
        "skip optimizer steps whose loss is non-finite or spikes, rewind to the last checkpoint after repeated skips",
        BOOL,
    ),
    Flag(
        ("--loss-spike-factor",),
        "train.guard.loss_spike",
        "skip a step whose loss exceeds this x the recent mean (0 = off)",
        {"type": float},
    ),
    Flag(
        ("--grad-norm-spike-factor",),
        "train.guard.grad_norm_spike",
        "skip a step whose gradient norm exceeds this x the recent mean (0 = off)",
        {"type": float},
    ),
    Flag(
        ("--spike-window",),
        "train.guard.window",
        "steps the spike tests average over and count skips in",
        {"type": int},
    ),
    Flag(
        ("--max-skipped-steps",),
        "train.guard.max_skips",
        "skipped steps within --spike-window that rewind to the last verified checkpoint",
        {"type": int},
    ),
    Flag(("--max-rewinds",), "train.guard.max_rewinds", "rewinds before the run stops with E301", {"type": int}),
    Flag(
        ("--auto-batch-size",),
        "train.auto_batch_size",
        "on a GPU, the largest micro-batch the memory model fits in --target-memory-usage (accumulation grown to "
        "keep the global batch)",
        ON,
    ),
    Flag(
        ("--target-memory-usage",),
        "train.target_memory_usage",
        "share of GPU memory --auto-batch-size plans for",
        {"type": float},
    ),
]
RUN_FLAGS = [
    Flag(("--experiment-name",), "logging.experiment_name", "the run directory's name under --output-dir"),
    Flag(("--output-dir",), "logging.output_dir", "parent of the run directory"),
    Flag(
        ("--eval-every-n-batches",), "train.eval_every_n_batches", "optimizer steps between evaluations", {"type": int}
    ),
    Flag(("--log-every-n-batches",), "logging.log_every_n_batches", "optimizer steps between log lines", {"type": int}),
    Flag(
        ("--save-every-n-batches",),
        "checkpoint.save_every_n_batches",
        "optimizer steps between checkpoints",
        {"type": int},
    ),
    Flag(("--save-total-limit",), "checkpoint.save_total_limit", "newest checkpoints kept", {"type": int}),
    Flag(
        ("--resume",),
        "checkpoint.resume",
        "run dir, checkpoints dir or checkpoint tag to resume from",
        default="start fresh",
    ),
    Flag(("--auto-resume",), "checkpoint.auto_resume", "resume from this experiment's latest checkpoint", ON),
    Flag(
        ("--init-from",),
        "checkpoint.init_from",
        "start from these weights with a fresh optimizer and schedule: a lumina-ds run dir or tag, or a Hugging Face "
        "model dir (config.json + safetensors); the architecture and tokenizer come from it",
        default="fresh weights",
    ),
    Flag(
        ("--strict-resume",),
        "checkpoint.strict_resume",
        "stop with E303 when the checkpoint fails verification, instead of falling back to the previous one",
        ON,
    ),
    Flag(
        ("--backup-dir",),
        "checkpoint.backup_dir",
        "copy checkpoints to DIR/<experiment-name>/<tag> in the background, verified against their checksums",
        {"metavar": "DIR"},
        "no backups",
    ),
    Flag(
        ("--backup-every-n-hours",),
        "checkpoint.backup_every_n_hours",
        "hours since the last backup before a checkpoint is copied (0 = every checkpoint)",
        {"type": float, "metavar": "H"},
    ),
    Flag(
        ("--backup-total-limit",),
        "checkpoint.backup_total_limit",
        "newest backups kept in the backup dir (the best evaluation's is kept too)",
        {"type": int, "metavar": "N"},
    ),
    Flag(("--tensorboard",), "logging.tensorboard", "write TensorBoard scalars to <run dir>/tensorboard", BOOL),
    Flag(("--progress-bar",), "logging.progress_bar", "a progress bar when the console is a terminal", BOOL),
    Flag(
        ("--peak-tflops",),
        "logging.peak_tflops",
        "dense peak TFLOP/s of one device, the denominator of the logged MFU",
        {"type": float, "metavar": "X"},
        "the GPU's bf16 peak from lumina_ds/planning/hardware.py; none on a CPU (MFU null)",
    ),
    Flag(
        ("--wandb",),
        "logging.wandb",
        "log the TensorBoard scalars and the run config to Weights & Biases (rank 0; WANDB_MODE=offline needs no "
        "network; pip install lumina-ds[wandb])",
        ON,
        "off",
    ),
    Flag(("--wandb-project",), "logging.wandb_project", "W&B project"),
    Flag(("--wandb-entity",), "logging.wandb_entity", "W&B entity (user or team)", {}, "your W&B default"),
    Flag(("--wandb-run-name",), "logging.wandb_run_name", "W&B run name", {}, "the experiment name"),
    Flag(
        ("--profile-training",),
        "logging.profile_training",
        "torch.profiler over STEPS steps (5 when no number is given) after 1 wait and 1 warm-up step: a Chrome trace "
        "and the top-20 operators by self time in <run dir>/profile (rank 0)",
        {"type": int, "nargs": "?", "const": 5, "metavar": "STEPS"},
        "off",
    ),
    Flag(
        ("--profile-memory",),
        "logging.profile_memory",
        "peak memory of forward, backward and optimizer step in <run dir>/profile/memory.json (CPU: peak RSS; GPU: "
        "peak allocated, plus a CUDA memory snapshot) (rank 0)",
        ON,
        "off",
    ),
    Flag(
        ("--test-generation",),
        "logging.test_generation",
        "after training, answer the default prompts greedily into <run dir>/generations.jsonl (rank 0)",
        ON,
        "off",
    ),
]
PARALLEL_FLAGS = [
    Flag(
        ("--zero-stage",),
        "distributed.zero_stage",
        "DeepSpeed ZeRO stage",
        {"type": int, "choices": (0, 1, 2, 3)},
        "the preset's planned layout (debug: 2), else 1",
    ),
    Flag(
        ("--expert-parallel-size",),
        "distributed.expert_parallel_size",
        "experts split over this many ranks (divides the experts and the process count)",
        {"type": int},
        "the preset's planned layout, shrunk to divide the process count",
    ),
    Flag(
        ("--moe-backend",),
        "distributed.moe_backend",
        "autoep (dropless, ZeRO 0-3) or DeepSpeed's native MoE layer (capacity factor, ZeRO <= 2)",
        {"choices": ("autoep", "native")},
    ),
    Flag(
        ("--deepspeed-config",),
        "distributed.deepspeed_config",
        "a DeepSpeed JSON with keys lumina-ds does not decide (buckets, overlap, offload, ...); keys a flag owns "
        "are refused (E002)",
        default="none",
    ),
    Flag(
        ("--offload",),
        "distributed.offload",
        "ZeRO-Offload: optimizer states (and, at ZeRO-3, parameters) in host memory, stepped by DeepSpeed's CPU Adam",
        {"choices": OFFLOAD_MODES},
        "the preset's planned layout, else none",
    ),
    Flag(
        ("--dist-timeout-minutes",),
        "distributed.timeout_minutes",
        "how long ranks wait at a collective (rank 0 training the tokenizer, building shards, writing weights) "
        "before the job is aborted",
        {"type": int},
    ),
    Flag(
        ("--deterministic-gating",),
        "distributed.deterministic_gating",
        "native MoE: no random 2nd-expert sampling or token selection",
        ON,
    ),
    Flag(("--num-experts",), "model.moe.num_experts", "routed experts per MoE layer (0 = dense)", {"type": int}),
    Flag(("--top-k",), "model.moe.top_k", "experts per token", {"type": int}),
    Flag(("--capacity-factor",), "model.moe.capacity_factor", "native MoE: expert capacity factor", {"type": float}),
    Flag(
        ("--load-balancing-weight",),
        "model.moe.load_balancing_weight",
        "weight of the load-balancing loss",
        {"type": float},
    ),
    Flag(("--router-z-loss-weight",), "model.moe.router_z_loss_weight", "weight of the router z-loss", {"type": float}),
    Flag(
        ("--attention-backend",),
        "model.attention_backend",
        "attention over packed rows",
        {"choices": ATTENTION_BACKENDS},
    ),
    Flag(
        ("--init-scheme",),
        "model.init_scheme",
        "std of the residual-branch outputs (o_proj, w2) at initialisation; the rest is normal(init_std)",
        {"choices": INIT_SCHEMES},
    ),
]
FLAG_GROUPS = {
    "data": DATA_FLAGS,
    "optimisation": OPTIM_FLAGS,
    "logging and checkpoints": RUN_FLAGS,
    "distribution and MoE": PARALLEL_FLAGS,
}
# flag dest -> (config section, field); sections "model.moe" reach into the nested MoE config
FLAG_FIELDS: dict[str, tuple[str, str]] = {
    flag.dest: tuple(flag.target.rsplit(".", 1))  # type: ignore[misc]
    for flags in FLAG_GROUPS.values()
    for flag in flags
}
STRATEGY_SHORTCUTS = (("--force-streaming", "streaming"), ("--force-memory-loading", "memory"),
                      ("--disable-sharding", "memory"))  # fmt: skip


@functools.cache
def _preset_values(target: str) -> dict[str, Any]:
    values = {}
    for name in PRESETS:
        value: Any = get_preset(name)
        for part in target.split("."):
            value = getattr(value, part)
        values[name] = value
    return values


def default_text(flag: Flag) -> str:
    """What the flag's field is when the flag is not given: one value, or the preset's."""
    if flag.default is not None:
        return flag.default
    values = _preset_values(flag.target)
    shown = {name: "none" if v is None else ("on" if v is True else "off" if v is False else v) for name, v in
             values.items()}  # fmt: skip
    if len(set(map(str, shown.values()))) == 1:
        return str(shown["debug"])
    return f"the preset's; debug: {shown['debug']}"


def _add_flag(group: argparse._ArgumentGroup, flag: Flag) -> None:
    options = dict(flag.options)
    options.setdefault("dest", flag.dest)
    group.add_argument(*flag.names, help=f"{flag.help} (default: {default_text(flag)})", **options)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", "--config", dest="preset", metavar="PRESET",
                     help=f"model preset: {', '.join(PRESETS)} (default: debug)")  # fmt: skip
    src.add_argument("--config-file", help="a YAML run config, e.g. a run's config.yaml (default: none)")
    for title, flags in FLAG_GROUPS.items():
        group = p.add_argument_group(title)
        for flag in flags:
            _add_flag(group, flag)
        if title == "data":
            for name, value in STRATEGY_SHORTCUTS:
                group.add_argument(name, dest="data_strategy", action="store_const", const=value,
                                   help=f"= --data-strategy {value} (default: off)")  # fmt: skip
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher


def _set(run: RunConfig, section: str, name: str, value: Any) -> None:
    target: Any = run
    for part in section.split("."):
        target = getattr(target, part)
    setattr(target, name, value)


def explicit_flags(args: argparse.Namespace) -> set[str]:
    """The dests of the training flags given on the command line."""
    return {dest for dest in FLAG_FIELDS if getattr(args, dest, None) is not None}


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """Preset (E001 when unknown) or YAML file first, then every flag that was given on top."""
    if config_file_given_as_preset(args.preset):
        raise ConfigError(
            "E002",
            f"--config {args.preset}: --config names a preset here ({', '.join(PRESETS)})",
            f"LuminaAI's --config FILE.yaml is --config-file {args.preset}",
        )
    run = load_config(args.config_file) if args.config_file else get_preset(args.preset or "debug")
    if {"activation_checkpointing", "gradient_checkpointing"} <= explicit_flags(args):
        raise ConfigError("E002", "--gradient-checkpointing and --activation-checkpointing both given",
                          "--gradient-checkpointing is --activation-checkpointing full; give one")  # fmt: skip
    for dest in explicit_flags(args):
        section, name = FLAG_FIELDS[dest]
        _set(run, section, name, getattr(args, dest))
    run.validate()
    return run


def resolve_run(args: argparse.Namespace, *, world_size: int, announce: bool = True) -> RunConfig:
    """The run config every launcher trains with for these flags on `world_size` processes.

    Flags over the preset or YAML; the --deepspeed-config keys; the preset's planned layout for the fields no flag
    set; then every rule on the config alone (E002) and every input path (E104), before anything is built.
    """
    from lumina_ds.data.documents import check_input_files
    from lumina_ds.distributed.ds_config import load_deepspeed_json

    run = run_config_from_args(args)
    if run.checkpoint.init_from:
        adopt_init_source(run, explicit_flags(args), announce=announce)
    if run.distributed.deepspeed_config:
        user = load_deepspeed_json(run.distributed.deepspeed_config)
        run.distributed.deepspeed = deep_merge(run.distributed.deepspeed, user)
        run.validate()  # owned keys in the user's JSON are refused before the layout adds anything
    if not args.config_file and not run.checkpoint.init_from:
        _adopt_preset_layout(run, explicit_flags(args), world_size=world_size, announce=announce)
    run.validate()
    check_input_files(run.data)
    return run


ARCHITECTURE_FLAGS = ("num_experts", "top_k", "init_scheme")  # from the source; loss weights and backends may change


def adopt_init_source(run: RunConfig, explicit: set[str], *, announce: bool) -> None:
    """--init-from: the model (and, unless --tokenizer is given, the tokenizer) come from the source; a flag that
    would change the architecture is E002."""
    from lumina_ds.hf.source import check_tokenizer_fits, open_model_source

    assert run.checkpoint.init_from is not None
    changed = sorted(f"--{d.replace('_', '-')}" for d in explicit if d in ARCHITECTURE_FLAGS)
    if changed:
        raise ConfigError("E002", f"{', '.join(changed)} cannot change a model given by --init-from",
                          "the architecture comes from the source; drop the flag")  # fmt: skip
    source = open_model_source(run.checkpoint.init_from)
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


def _adopt_preset_layout(run: RunConfig, explicit: set[str], *, world_size: int, announce: bool) -> None:
    from lumina_ds.planning.layouts import LAYOUTS_DIR, adopt_layout, load_layout

    layout = load_layout(run.preset)
    if layout is None:
        return
    notes = adopt_layout(run, layout, world_size=world_size, explicit=explicit)
    if announce:
        print(f"planned layout: {LAYOUTS_DIR / (run.preset + '.json')} (flags given on the command line win)")
        for note in notes:
            print(f"  {note}")


def cmd_train(args: argparse.Namespace) -> int:
    from lumina_ds.distributed.launchers import detect_launch
    from lumina_ds.training.session import profile_data_loading, train

    if args.profile_data_loading:
        profile_data_loading(resolve_run(args, world_size=1), batches=args.profile_data_loading)
        return 0
    launch = detect_launch(os.environ)  # this rank's place in the job, read without starting anything
    run = resolve_run(args, world_size=launch.world_size, announce=launch.rank == 0)
    if run.train.auto_batch_size:
        line = size_micro_batch(run, world_size=launch.world_size, ranks_per_node=launch.local_world_size,
                                local_rank=launch.local_rank)  # fmt: skip
        if launch.rank == 0:
            print(line, flush=True)
    if launch.rank == 0:
        warn_if_checkpoints_outgrow_disk(run)
    resolve_peak_tflops(run, local_rank=launch.local_rank)
    code = int(train(run).get("exit_code", 0))
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
    from lumina_ds.planning.memory import GIB, ParamInventory, checkpoint_tag_bytes

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
    p.set_defaults(func=cmd_train)
