"""`lumina-ds train`'s flags: each names the one RunConfig field it sets, its help and its default as shown."""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass, field
from typing import Any

from lumina_ds.config.presets import PRESETS, get_preset
from lumina_ds.config.run import (
    ACTIVATION_CHECKPOINTING,
    DATA_FORMATS,
    DATA_STRATEGIES,
    OFFLOAD_DEVICES,
    OFFLOAD_MODES,
    PRECISIONS,
    SCHEDULERS,
)
from lumina_ds.models.config import ATTENTION_BACKENDS, INIT_SCHEMES


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
    Flag(
        ("--allow-changed-data",),
        "data.allow_changed_data",
        "resume on training data that changed since the checkpoint (edited or grown files): from the saved row, with "
        "a warning, instead of E107",
        ON,
    ),
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
        ("--eval-every-n-steps", "--eval-every-n-batches"),
        "train.eval_every_n_steps",
        "optimizer steps between evaluations",
        {"type": int},
    ),
    Flag(
        ("--log-every-n-steps", "--log-every-n-batches"),
        "logging.log_every_n_steps",
        "optimizer steps between log lines",
        {"type": int},
    ),
    Flag(
        ("--save-every-n-steps", "--save-every-n-batches"),
        "checkpoint.save_every_n_steps",
        "optimizer steps between checkpoints",
        {"type": int},
    ),
    Flag(("--save-total-limit",), "checkpoint.save_total_limit", "newest checkpoints kept", {"type": int}),
    Flag(
        ("--save-every-minutes",),
        "checkpoint.save_every_minutes",
        "also save when this many minutes have passed since the last save (rank 0's clock, agreed by every rank)",
        {"type": float, "metavar": "M"},
        "off",
    ),
    Flag(
        ("--consolidate",),
        "checkpoint.consolidate",
        "which tags get consolidated safetensors weights: final (the run's last tag; export, chat and --init-from "
        "write them into any other tag when first asked), every (each tag: slower saves), never",
        {"choices": ["final", "every", "never"]},
    ),
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
        ("--offload-device",),
        "distributed.offload_device",
        "where --offload puts the states: cpu (host memory) or nvme (ZeRO-Infinity: swap files under --nvme-path, "
        "through DeepSpeed's AsyncIO op; ZeRO-3, needs libaio-dev)",
        {"choices": OFFLOAD_DEVICES},
    ),
    Flag(
        ("--nvme-path",),
        "distributed.nvme_path",
        "a directory on a local NVMe drive (same path on every node) for --offload-device nvme: each run swaps in "
        "its own <experiment>-<token>/ there, removed when the run ends",
        {"metavar": "DIR"},
        "none",
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
