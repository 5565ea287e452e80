"""Training flags (shared by `lumina-ds train` and `launch/train.py`) and their mapping onto RunConfig."""

from __future__ import annotations

import argparse
from typing import Any

from lumina_ds.config.io import load_config
from lumina_ds.config.model import ATTENTION_BACKENDS
from lumina_ds.config.presets import PRESETS, get_preset
from lumina_ds.config.run import DATA_STRATEGIES, PRECISIONS, SCHEDULERS, RunConfig

# flag dest -> (config section, field); sections "model.moe" reach into the nested MoE config
FLAG_FIELDS: dict[str, tuple[str, str]] = {
    "train_data": ("data", "train_data"),
    "eval_data": ("data", "eval_data"),
    "tokenizer": ("data", "tokenizer"),
    "seq_len": ("data", "seq_len"),
    "train_on": ("data", "train_on"),
    "data_strategy": ("data", "strategy"),
    "num_workers": ("data", "num_workers"),
    "prefetch_factor": ("data", "prefetch_factor"),
    "shard_size_mb": ("data", "shard_size_mb"),
    "prepared_dir": ("data", "prepared_dir"),
    "strict": ("data", "strict"),
    "epochs": ("train", "epochs"),
    "max_steps": ("train", "max_steps"),
    "micro_batch_size": ("train", "micro_batch_size"),
    "grad_accum": ("train", "grad_accum"),
    "learning_rate": ("train", "learning_rate"),
    "min_lr": ("train", "min_lr"),
    "warmup_ratio": ("train", "warmup_ratio"),
    "warmup_steps": ("train", "warmup_steps"),
    "lr_scheduler": ("train", "lr_scheduler"),
    "optimizer": ("train", "optimizer"),
    "weight_decay": ("train", "weight_decay"),
    "max_grad_norm": ("train", "max_grad_norm"),
    "beta1": ("train", "beta1"),
    "beta2": ("train", "beta2"),
    "eps": ("train", "eps"),
    "seed": ("train", "seed"),
    "precision": ("train", "precision"),
    "gradient_checkpointing": ("train", "gradient_checkpointing"),
    "eval_every_n_batches": ("train", "eval_every_n_batches"),
    "early_stopping_patience": ("train", "early_stopping_patience"),
    "save_every_n_batches": ("checkpoint", "save_every_n_batches"),
    "save_total_limit": ("checkpoint", "save_total_limit"),
    "resume": ("checkpoint", "resume"),
    "auto_resume": ("checkpoint", "auto_resume"),
    "output_dir": ("logging", "output_dir"),
    "experiment_name": ("logging", "experiment_name"),
    "log_every_n_batches": ("logging", "log_every_n_batches"),
    "tensorboard": ("logging", "tensorboard"),
    "progress_bar": ("logging", "progress_bar"),
    "zero_stage": ("distributed", "zero_stage"),
    "expert_parallel_size": ("distributed", "expert_parallel_size"),
    "moe_backend": ("distributed", "moe_backend"),
    "deepspeed_config": ("distributed", "deepspeed_config"),
    "deterministic_gating": ("distributed", "deterministic_gating"),
    "num_experts": ("model.moe", "num_experts"),
    "top_k": ("model.moe", "top_k"),
    "capacity_factor": ("model.moe", "capacity_factor"),
    "load_balancing_weight": ("model.moe", "load_balancing_weight"),
    "router_z_loss_weight": ("model.moe", "router_z_loss_weight"),
    "attention_backend": ("model", "attention_backend"),
}


def _group_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--train-data", help="JSONL conversations: FILE[,FILE2:WEIGHT,...] (weight = copies per epoch)")
    g.add_argument("--eval-data", help="JSONL conversations to evaluate on")
    g.add_argument("--tokenizer", help="a tokenizer.json (default: train a byte-level BPE on the training data)")
    g.add_argument("--seq-len", type=int, help="packed row length in tokens (default: min(context, 4096))")
    g.add_argument("--train-on", choices=("assistant", "all"), help="which tokens carry loss (default: assistant)")
    g.add_argument(
        "--train-data-strategy",
        "--data-strategy",
        dest="data_strategy",
        choices=DATA_STRATEGIES,
        help="memory: tokenize into RAM; sharded: memory-mapped token shards; streaming: tokenize on the fly "
        "(default auto: < 500 MB memory, < 10 GB sharded, else streaming)",
    )
    for flag, value in (("--force-streaming", "streaming"), ("--force-memory-loading", "memory")):
        g.add_argument(flag, dest="data_strategy", action="store_const", const=value, help=f"= --data-strategy {value}")
    g.add_argument("--disable-sharding", dest="data_strategy", action="store_const", const="memory", help="= memory")
    g.add_argument("--num-workers", type=int, help="tokenizing processes / streaming loader workers (default 2)")
    g.add_argument("--prefetch-factor", type=int, help="chunks each streaming worker keeps ready (default 2)")
    g.add_argument("--shard-size-mb", type=int, help="JSONL megabytes per prepared shard (default 256)")
    g.add_argument("--prepared-dir", help="prepared-shard cache (default: <output-dir>/prepared)")
    g.add_argument("--strict", action="store_true", default=None, help="stop at the first malformed line (E101-E103)")


def _group_optim(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    g.add_argument("--micro-batch-size", "--batch-size", dest="micro_batch_size", type=int, help="per-GPU rows")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    g.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float)
    g.add_argument("--min-lr", type=float)
    g.add_argument("--warmup-ratio", type=float)
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--lr-scheduler", choices=SCHEDULERS)
    g.add_argument("--optimizer", choices=("adamw",))
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping (0 disables)")
    g.add_argument("--beta1", type=float)
    g.add_argument("--beta2", type=float)
    g.add_argument("--eps", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--precision", choices=PRECISIONS)
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--early-stopping-patience", type=int, help="evaluations without improvement before stopping")


def _group_run(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--experiment-name")
    g.add_argument("--output-dir", help="parent of the run directory (default: runs)")
    g.add_argument("--eval-every-n-batches", type=int)
    g.add_argument("--log-every-n-batches", type=int)
    g.add_argument("--save-every-n-batches", type=int)
    g.add_argument("--save-total-limit", type=int)
    g.add_argument("--resume", help="run dir, checkpoints dir or checkpoint tag to resume from")
    g.add_argument("--auto-resume", action="store_true", default=None, help="resume from the latest checkpoint")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--progress-bar", action=argparse.BooleanOptionalAction, default=None)


def _group_parallel(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distribution and MoE")
    g.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3))
    g.add_argument("--expert-parallel-size", type=int)
    g.add_argument("--moe-backend", choices=("autoep", "native"))
    g.add_argument("--deepspeed-config", help="a DeepSpeed JSON whose keys override the generated config")
    g.add_argument("--deterministic-gating", action="store_true", default=None, help="native MoE: no random gating")
    g.add_argument("--num-experts", type=int)
    g.add_argument("--top-k", type=int)
    g.add_argument("--capacity-factor", type=float)
    g.add_argument("--load-balancing-weight", type=float)
    g.add_argument("--router-z-loss-weight", type=float)
    g.add_argument("--attention-backend", choices=ATTENTION_BACKENDS)
    g.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", "--config", dest="preset", choices=list(PRESETS), help="model preset (default debug)")
    src.add_argument("--config-file", help="a YAML RunConfig (see `lumina-ds train --help` and the README)")
    for group in (_group_data, _group_optim, _group_run, _group_parallel):
        group(p)


def _set(run: RunConfig, section: str, field: str, value: Any) -> None:
    target: Any = run
    for part in section.split("."):
        target = getattr(target, part)
    setattr(target, field, value)


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """Preset or YAML file first, then every flag that was given on top."""
    run = load_config(args.config_file) if args.config_file else get_preset(args.preset or "debug")
    for dest, (section, field) in FLAG_FIELDS.items():
        value = getattr(args, dest, None)
        if value is not None:
            _set(run, section, field, value)
    run.validate()
    return run
