"""Per-component run configs (data, optimisation, checkpoints, logging, distribution) composed into RunConfig."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lumina_ds.errors import ConfigError
from lumina_ds.frozen import Freezable
from lumina_ds.models.config import ModelConfig

CONSOLIDATE_CHOICES = ("final", "every", "never")  # CheckpointConfig.consolidate
SIGNAL_MARGIN_S = 30.0  # a stop signal's lead beyond a step and a save: process exit, teardown, the last sync
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "mixed_fp16", "mixed_bf16")
SCHEDULERS = ("cosine", "linear", "onecycle", "none")
# what backward recomputes: every block (full), only each block's attention sub-block or only its MoE/FFN sub-block
# (selective; `selective` itself means `attention`), or nothing (models/transformer.py Block)
ACTIVATION_CHECKPOINTING = ("none", "full", "selective", "attention", "moe")

DATA_STRATEGIES = ("auto", "memory", "sharded", "streaming")
DATA_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt-completion")  # record formats (data/formats.py)
MAX_LINE_BYTES = 4 << 20  # a JSONL line past this is skipped (E111) or cut (--truncate-long): ~1M tokens of text
MIN_LINE_BYTES = 1024


@dataclass
class DataConfig(Freezable):
    train_data: str | None = None
    eval_data: str | None = None
    tokenizer: str | None = None  # a tokenizer.json; None trains a byte-level BPE on the training data
    seq_len: int | None = None  # packed row length; None = min(model.max_seq_len, 4096)
    train_on: str = "assistant"  # assistant | all
    strategy: str = "auto"  # auto | memory | sharded | streaming (auto: by dataset size and free RAM)
    num_workers: int = 2  # tokenizing processes (memory/sharded) and loader workers (streaming)
    prefetch_factor: int = 2  # micro-batches each streaming worker keeps ready
    shard_size_mb: int = 256  # JSONL bytes per prepared shard
    prepared_dir: str | None = None  # prepared-shard cache; None = <output_dir>/prepared
    strict: bool = False  # stop at the first malformed line instead of skipping it
    max_line_bytes: int = MAX_LINE_BYTES  # longer lines are skipped (E111) without being read into memory
    truncate_long: bool = False  # cut the message contents of longer lines to fit instead (W106)
    allow_changed_data: bool = False  # resume on training data that differs from the checkpoint's (else E107)
    data_format: str = "auto"  # record format of every source: auto (detected per source) or one of DATA_FORMATS
    data_fields: str | None = None  # renamed fields, OUR=THEIRS[,...]: e.g. "instruction=question,output=answer"

    def validate(self) -> None:
        if self.train_on not in ("assistant", "all"):
            raise ConfigError("E002", f"train_on={self.train_on!r} is not one of assistant, all")
        if self.seq_len is not None and self.seq_len < 8:
            raise ConfigError("E002", f"seq_len={self.seq_len} is too short", "use at least 8 tokens per row")
        if self.strategy not in DATA_STRATEGIES:
            raise ConfigError("E002", f"unknown data strategy {self.strategy!r}", f"use one of {DATA_STRATEGIES}")
        if self.data_format not in DATA_FORMATS:
            raise ConfigError("E002", f"unknown data format {self.data_format!r}", f"use one of {DATA_FORMATS}")
        for name in ("prefetch_factor", "shard_size_mb"):
            if getattr(self, name) < 1:
                raise ConfigError("E002", f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ConfigError("E002", f"num_workers must be >= 0, got {self.num_workers}")
        if self.max_line_bytes < MIN_LINE_BYTES:
            raise ConfigError("E002", f"max_line_bytes must be at least {MIN_LINE_BYTES}, got {self.max_line_bytes}")


@dataclass
class GuardConfig(Freezable):
    """The divergence guard: skip an optimizer step whose loss or gradient norm spikes, rewind after repeated skips."""

    enabled: bool = True
    window: int = 50  # accepted steps the spike tests compare against; skips are counted over as many steps
    loss_spike: float = 3.0  # a step's loss above this x the window's mean, or above 2 ln(vocab), is skipped (0 = off)
    grad_norm_spike: float = 100.0  # a pre-clipping gradient norm above this x the window's mean is skipped (0 = off)
    min_history: int = 10  # accepted steps before the spike tests start (non-finite losses are always skipped)
    max_skips: int = 3  # skipped steps within `window` steps that rewind to the last verified checkpoint
    max_rewinds: int = 2  # rewinds after which the run stops with E301

    def validate(self) -> None:
        if self.window < 1 or self.min_history < 1 or self.max_skips < 1 or self.max_rewinds < 0:
            raise ConfigError("E002", "guard window, min_history and max_skips must be >= 1, max_rewinds >= 0")
        if self.loss_spike < 0 or self.grad_norm_spike < 0 or 0 < self.loss_spike <= 1 or 0 < self.grad_norm_spike <= 1:
            raise ConfigError(
                "E002",
                f"spike factors must be 0 (off) or above 1, got loss {self.loss_spike}, "
                f"grad norm {self.grad_norm_spike}",
                "a factor of 3 skips a step whose loss is 3x the recent mean",
            )


@dataclass
class TrainConfig(Freezable):
    epochs: int = 3
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    micro_batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 5e-4
    min_lr: float = 1e-6
    warmup_ratio: float = 0.15
    warmup_steps: int | None = None  # overrides warmup_ratio
    lr_scheduler: str = "cosine"
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    seed: int = 42
    precision: str = "auto"
    activation_checkpointing: str = "none"  # see ACTIVATION_CHECKPOINTING
    compile: bool = False  # torch.compile each block's attention and norms (and dense FFNs); MoE dispatch stays eager
    eval_every_n_steps: int = 100
    early_stopping_patience: int | None = None  # evaluations without improvement before stopping
    guard: GuardConfig = field(default_factory=GuardConfig)
    auto_batch_size: bool = False  # pick the largest micro-batch the memory model fits in target_memory_usage
    target_memory_usage: float = 0.9  # share of the GPU's memory --auto-batch-size may plan for

    @property
    def gradient_checkpointing(self) -> bool:
        """The boolean of older configs and flags: any recompute at all; setting it means full or none."""
        return self.activation_checkpointing != "none"

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.activation_checkpointing = "full" if on else "none"

    @property
    def recompute(self) -> str:
        """The mode the model applies: none, full, attention or moe (`selective` is attention)."""
        return "attention" if self.activation_checkpointing == "selective" else self.activation_checkpointing

    def validate(self) -> None:
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ConfigError("E002", f"unknown activation_checkpointing {self.activation_checkpointing!r}",
                              f"choose one of {', '.join(ACTIVATION_CHECKPOINTING)}")  # fmt: skip
        if self.precision not in PRECISIONS:
            raise ConfigError("E002", f"unknown precision {self.precision!r}", f"choose one of {', '.join(PRECISIONS)}")
        if self.lr_scheduler not in SCHEDULERS:
            raise ConfigError("E002", f"unknown lr_scheduler {self.lr_scheduler!r}", f"choose one of {SCHEDULERS}")
        if self.optimizer != "adamw":
            raise ConfigError("E002", f"unknown optimizer {self.optimizer!r}", "adamw is the supported optimizer")
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("E002", "micro_batch_size and grad_accum must be >= 1")
        if self.epochs < 1 and self.max_steps is None:
            raise ConfigError("E002", "epochs must be >= 1 (or give max_steps)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("E002", f"max_steps={self.max_steps} must be >= 1")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError("E002", f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.learning_rate <= 0 or self.min_lr < 0 or self.min_lr > self.learning_rate:
            raise ConfigError("E002", "need 0 <= min_lr <= learning_rate and learning_rate > 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1) or self.eps <= 0 or self.max_grad_norm < 0:
            raise ConfigError("E002", "betas must be in [0, 1), eps > 0, max_grad_norm >= 0 (0 disables clipping)")
        if not 0.1 <= self.target_memory_usage <= 1.0:
            raise ConfigError("E002", f"target_memory_usage={self.target_memory_usage} must be in [0.1, 1]")
        self.guard.validate()


@dataclass
class CheckpointConfig(Freezable):
    save_every_n_steps: int = 500  # optimizer steps between checkpoints
    save_total_limit: int = 5  # newest checkpoints kept; older ones deleted
    resume: str | None = None  # a checkpoint tag dir, a checkpoints dir or a run dir
    auto_resume: bool = False  # resume from the latest tag of this experiment if there is one
    weights_shard_mb: int = 5120  # consolidated weights are written in safetensors shards of at most this size
    strict_resume: bool = False  # a tag that fails verification stops the run instead of falling back to an older
    init_from: str | None = None  # weights only (fresh optimizer and schedule): a run dir, tag or HF model dir
    backup_dir: str | None = None  # verified copies of tags go to <backup_dir>/<experiment_name>/<tag>
    backup_every_n_hours: float = 0.0  # hours since the last backup before the next checkpoint is copied (0 = each)
    backup_total_limit: int = 2  # newest backups kept in the backup dir (and the best evaluation's)
    save_every_minutes: float = 0.0  # minutes since the last save (rank 0's clock) before the next one (0 = off)
    consolidate: str = "final"  # which tags get consolidated weights: the run's last (final), every tag, or none

    def validate(self) -> None:
        if self.save_every_n_steps < 1 or self.save_total_limit < 1 or self.weights_shard_mb < 1:
            raise ConfigError("E002", "save_every_n_steps, save_total_limit and weights_shard_mb must be >= 1")
        if self.save_every_minutes < 0:
            raise ConfigError("E002", f"save_every_minutes={self.save_every_minutes} must be >= 0 (0 turns it off)")
        if self.consolidate not in CONSOLIDATE_CHOICES:
            raise ConfigError("E002", f"unknown consolidate {self.consolidate!r}",
                              f"choose one of {', '.join(CONSOLIDATE_CHOICES)}")  # fmt: skip
        if self.backup_every_n_hours < 0 or self.backup_total_limit < 1:
            raise ConfigError("E002", "backup_every_n_hours must be >= 0 and backup_total_limit >= 1")


@dataclass
class LoggingConfig(Freezable):
    output_dir: str = "runs"
    experiment_name: str = "run"
    log_every_n_steps: int = 10
    tensorboard: bool = True
    progress_bar: bool = True
    peak_tflops: float | None = None  # MFU's denominator per device; None: the GPU's dense bf16 peak from the table
    wandb: bool = False
    wandb_project: str = "lumina-ds"
    wandb_entity: str | None = None
    wandb_run_name: str | None = None  # None: the experiment name
    profile_training: int = 0  # steps torch.profiler records (0 = off)
    profile_memory: bool = False
    test_generation: bool = False

    @property
    def run_dir(self) -> Path:
        """`<output_dir>/<experiment_name>`: every file of the run lives here (see lumina_ds/run_dir.py)."""
        return Path(self.output_dir).expanduser() / self.experiment_name

    def validate(self) -> None:
        if self.log_every_n_steps < 1:
            raise ConfigError("E002", "log_every_n_steps must be >= 1")
        if not self.experiment_name or "/" in self.experiment_name:
            raise ConfigError("E002", f"experiment_name {self.experiment_name!r} must be a non-empty plain name")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError("E002", f"peak_tflops={self.peak_tflops} must be > 0", "the device's dense TFLOP/s")
        if self.profile_training < 0:
            raise ConfigError("E002", f"profile_training={self.profile_training} must be >= 0", "0 turns it off")


# DeepSpeed keys that are decisions of the run config (the loop and DeepSpeed must agree on them), with the flag
# that sets each; a --deepspeed-config file may repeat the run's values (ds_configs/<preset>.json do) but not change
# them (distributed/ds_config.py checks them against the resolved run); a YAML's distributed.deepspeed may not set them
OWNED_DEEPSPEED_KEYS: dict[str, str] = {
    "train_batch_size": "--micro-batch-size and --grad-accum (train_batch_size = micro x accum x processes)",
    "train_micro_batch_size_per_gpu": "--micro-batch-size",
    "gradient_accumulation_steps": "--grad-accum",
    "gradient_clipping": "--max-grad-norm",
    "zero_optimization.stage": "--zero-stage",
    "bf16": "--precision",
    "fp16": "--precision",
    "amp": "--precision",
    "torch_autocast": "--precision",
    "data_types": "--precision (mixed_bf16 sums accumulated gradients in fp32 at ZeRO 1-3)",
    "expert_parallel": "--expert-parallel-size and --moe-backend",
    "optimizer": "--learning-rate, --beta1, --beta2, --eps and --weight-decay (lumina-ds builds the AdamW)",
    "scheduler": "--lr-scheduler, --warmup-ratio and --min-lr",
    "seed": "--seed",
    "zero_optimization.offload_optimizer": "--offload optimizer (lumina-ds then steps DeepSpeed's CPU Adam), "
    "--offload-device and --nvme-path (device, nvme_path and the swap buffers are derived from the model)",
    "zero_optimization.offload_param": "--offload optimizer+params, --offload-device and --nvme-path",
    # what the NVMe buffer sizes are derived from (distributed/nvme.py); the other aio keys are free to tune
    "aio.block_size": "--offload-device nvme (1 MiB, DeepSpeed's smallest swapped tensor)",
    "aio.intra_op_parallelism": "--offload-device nvme (1 thread per handle; the swap buffers are aligned to it)",
    "zero_force_ds_cpu_optimizer": "--offload (the offloaded optimizer is always DeepSpeed's CPU Adam)",
}
OFFLOAD_MODES = ("none", "optimizer", "optimizer+params")
OFFLOAD_DEVICES = ("cpu", "nvme")  # host memory (ZeRO-Offload) or NVMe swap files (ZeRO-Infinity)


def owned_keys_in(extras: dict[str, Any]) -> list[str]:
    """The OWNED_DEEPSPEED_KEYS present in a DeepSpeed JSON (nested keys as `section.key`)."""
    present = []
    for key in OWNED_DEEPSPEED_KEYS:
        section, _, inner = key.partition(".")
        value = extras.get(section)
        if (inner and isinstance(value, dict) and inner in value) or (not inner and section in extras):
            present.append(key)
    return present


def owned_value(config: dict[str, Any], key: str) -> Any:
    """The value of an OWNED_DEEPSPEED_KEYS key (`section.key` nested) in a DeepSpeed JSON; None when absent."""
    section, _, inner = key.partition(".")
    value = config.get(section)
    if not inner:
        return value
    return value.get(inner) if isinstance(value, dict) else None


def without_owned_keys(extras: dict[str, Any]) -> dict[str, Any]:
    """A DeepSpeed JSON without the keys the run config owns (a section they empty is dropped too)."""
    kept = {key: dict(value) if isinstance(value, dict) else value for key, value in extras.items()}
    for key in owned_keys_in(extras):
        section, _, inner = key.partition(".")
        if not inner:
            kept.pop(section)
            continue
        kept[section].pop(inner)
        if not kept[section]:
            kept.pop(section)
    return kept


def owned_key_flags(keys: list[str]) -> str:
    """The flag that sets each owned DeepSpeed key, for an E002's hint."""
    return "; ".join(f"{key}: use {OWNED_DEEPSPEED_KEYS[key]}" for key in keys)


def refuse_owned_keys(extras: dict[str, Any], *, source: str) -> None:
    """E002 naming the flags to use when a DeepSpeed JSON sets what the run config decides."""
    owned = owned_keys_in(extras)
    if owned:
        raise ConfigError(
            "E002",
            f"{source} sets {', '.join(owned)}, which lumina-ds decides from its own flags",
            f"{owned_key_flags(owned)}. A DeepSpeed JSON may only add what lumina-ds does not decide (buckets, "
            "overlap, communication, offload, ...)",
        )


@dataclass
class DistributedConfig(Freezable):
    zero_stage: int = 1
    expert_parallel_size: int = 1
    moe_backend: str = "autoep"  # autoep | native
    deepspeed_config: str | None = None  # a DeepSpeed JSON file, merged into `deepspeed` when the run is resolved
    deepspeed: dict[str, Any] = field(default_factory=dict)  # DeepSpeed keys the run config does not model
    deterministic_gating: bool = False  # native MoE: no Gumbel 2nd-expert sampling, no random token selection
    offload: str = "none"  # ZeRO-Offload to host memory: none | optimizer | optimizer+params (ZeRO-3)
    offload_device: str = "cpu"  # where the offloaded states live: cpu (host memory) | nvme (files under nvme_path)
    nvme_path: str | None = None  # a directory on a local NVMe drive of every node (each run swaps in its own subdir)
    # how long a collective may wait before the job is aborted: ranks wait at barriers while rank 0 trains the
    # tokenizer, local rank 0 builds shards or rank 0 writes weights (DeepSpeed's default is 10 minutes on NCCL)
    timeout_minutes: int = 120

    def validate(self) -> None:
        if self.timeout_minutes < 1:
            raise ConfigError("E002", f"timeout_minutes={self.timeout_minutes} must be >= 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("E002", f"zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.moe_backend not in ("autoep", "native"):
            raise ConfigError("E002", f"moe_backend={self.moe_backend!r} must be autoep or native")
        if self.expert_parallel_size < 1:
            raise ConfigError("E002", "expert_parallel_size must be >= 1")
        self._validate_offload()
        source = f"--deepspeed-config {self.deepspeed_config}" if self.deepspeed_config else "distributed.deepspeed"
        refuse_owned_keys(self.deepspeed, source=source)

    def _validate_offload(self) -> None:
        if self.offload not in OFFLOAD_MODES:
            raise ConfigError("E002", f"offload={self.offload!r} is not one of {', '.join(OFFLOAD_MODES)}")
        if self.offload != "none" and self.zero_stage == 0:
            raise ConfigError("E002", "ZeRO-Offload needs ZeRO stage 1, 2 or 3", "add --zero-stage 2 (or 3)")
        if self.offload == "optimizer+params" and self.zero_stage != 3:
            raise ConfigError(
                "E002",
                f"offloading parameters needs ZeRO stage 3 (this run has {self.zero_stage})",
                "use --zero-stage 3, or --offload optimizer",
            )
        self._validate_offload_device()

    def _validate_offload_device(self) -> None:
        if self.offload_device not in OFFLOAD_DEVICES:
            raise ConfigError("E002", f"offload_device={self.offload_device!r} is not one of cpu, nvme")
        if self.offload_device == "cpu":
            if self.nvme_path:
                raise ConfigError("E002", f"--nvme-path {self.nvme_path} is given but the offload device is cpu",
                                  "add --offload-device nvme to swap to it, or drop --nvme-path")  # fmt: skip
            return
        if self.offload == "none":
            raise ConfigError("E002", "--offload-device nvme needs something to offload (--offload is none)",
                              "add --offload optimizer+params (or optimizer) with --zero-stage 3")  # fmt: skip
        if not self.nvme_path:
            raise ConfigError("E002", "--offload-device nvme needs --nvme-path",
                              "give a directory on a local NVMe drive, at the same path on every node")  # fmt: skip
        if self.zero_stage != 3:  # only DeepSpeed's stage-3 optimizer swaps (stage_1_and_2.py has no swapper)
            raise ConfigError("E002", f"NVMe offload needs ZeRO stage 3 (this run has {self.zero_stage})",
                              "use --zero-stage 3, or --offload-device cpu")  # fmt: skip
        if self.moe_backend == "autoep" and self.expert_parallel_size > 1:  # DeepSpeed refuses it at the first save
            raise ConfigError(
                "E002",
                "DeepSpeed cannot checkpoint AutoEP experts at ZeRO-3 with the optimizer on NVMe",
                "use --expert-parallel-size 1 with --offload-device nvme, or --offload-device cpu",
            )


@dataclass
class RunConfig(Freezable):
    preset: str = "debug"  # the base of every setting a file or flag leaves out
    model_source: str = ""  # where the model came from (import-hf, --init-from); "" = the preset's model
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self) -> None:
        """Every rule that depends on the config alone (E002); world size and hardware are the pre-flight's."""
        for part in (self.model, self.data, self.train, self.checkpoint, self.logging, self.distributed):
            part.validate()
        self._validate_experts()
        self._validate_combinations()
        self._validate_backup_dir()

    def _validate_experts(self) -> None:
        moe, dist = self.model.moe, self.distributed
        ep = dist.expert_parallel_size
        if ep > 1 and not moe.enabled:
            raise ConfigError("E002", "expert_parallel_size > 1 needs a MoE model (num_experts > 0)")
        if moe.enabled and moe.num_experts % ep:
            divisors = [d for d in range(1, moe.num_experts + 1) if moe.num_experts % d == 0]
            raise ConfigError(
                "E002",
                f"num_experts={moe.num_experts} is not divisible by expert_parallel_size={ep}",
                f"use an expert-parallel size in {divisors} (it must also divide the number of processes)",
            )
        if moe.enabled and dist.moe_backend == "native" and dist.zero_stage == 3:
            raise ConfigError(
                "E002",
                "the native DeepSpeed MoE layer does not support ZeRO stage 3",
                "use --moe-backend autoep (AutoEP works at ZeRO 1-3), or --zero-stage 1/2 with the native backend",
            )
        universal = bool(dist.deepspeed.get("checkpoint", {}).get("load_universal"))
        if universal and moe.enabled and dist.moe_backend == "native":
            raise ConfigError(
                "E002",
                "a universal checkpoint cannot be loaded into the native DeepSpeed MoE layer",
                "train and resume with --moe-backend autoep, or resume at the same world size without load_universal",
            )

    def _validate_combinations(self) -> None:
        if self.train.precision == "bf16" and self.distributed.zero_stage == 0:
            raise ConfigError(
                "E002",
                "pure bf16 (bf16 master weights and optimizer states) needs ZeRO stage 1, 2 or 3",
                "use --zero-stage 1 or higher, or --precision mixed_bf16",
            )
        if self.train.compile and self.distributed.zero_stage == 3:  # untested: ZeRO-3 gathers in module hooks
            raise ConfigError("E002", "--compile is not supported at ZeRO stage 3",
                              "use --zero-stage 1 or 2 with --compile, or drop --compile")  # fmt: skip
        if self.seq_len > self.model.max_seq_len:
            raise ConfigError(
                "E002",
                f"seq_len={self.seq_len} is longer than the model's context of {self.model.max_seq_len} tokens",
                f"use --seq-len {self.model.max_seq_len} or less, or a preset with a longer context",
            )

    def _validate_backup_dir(self) -> None:
        backup = self.checkpoint.backup_dir
        root = Path(backup).expanduser() / self.logging.experiment_name if backup else None
        if root is not None and root.resolve() == self.logging.run_dir.resolve():
            raise ConfigError(
                "E002",
                f"--backup-dir {backup} is the --output-dir: the backups would land in the run directory itself",
                "give a backup directory elsewhere (another disk or file system is best)",
            )

    @property
    def seq_len(self) -> int:
        return self.data.seq_len or min(self.model.max_seq_len, 4096)

    @property
    def prepared_dir(self) -> Path:
        """The prepared-shard cache: shared by every experiment under one output dir unless --prepared-dir is set."""
        if self.data.prepared_dir:
            return Path(self.data.prepared_dir).expanduser()
        return Path(self.logging.output_dir).expanduser() / "prepared"
