"""One training run end to end: run dir, tokenizer, data, model, engine, resume, loop."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lumina_ds.config.io import config_to_dict, save_config
from lumina_ds.config.run import RunConfig
from lumina_ds.data.loader import BatchIterator, ChatDataset, PackedDataset, build_datasets
from lumina_ds.data.reader import read_conversations
from lumina_ds.data.sampler import ShardedSampler
from lumina_ds.data.tokenizer import ChatTokenizer, conversation_texts, train_bpe_tokenizer
from lumina_ds.distributed.ds_config import select_precision
from lumina_ds.distributed.env import DistInfo, barrier, init_distributed
from lumina_ds.errors import CheckpointError, ConfigError
from lumina_ds.monitor.callbacks import Callback, ConsoleLogger, JsonlLogger, TensorBoardLogger
from lumina_ds.run_dir import CONFIG_FILE, METRICS_FILE, TENSORBOARD_DIR, TOKENIZER_FILE
from lumina_ds.training.checkpoint import CheckpointManager
from lumina_ds.training.engine import build_engine
from lumina_ds.training.loop import LoopSettings, Trainer


def log(info: DistInfo, message: str) -> None:
    if info.is_main:
        print(message, flush=True)


def prepare_tokenizer(run: RunConfig, run_dir: Path, info: DistInfo) -> ChatTokenizer:
    """An explicit --tokenizer; else the run's own (a resumed run keeps its vocabulary); else train a BPE."""
    own = run_dir / TOKENIZER_FILE
    if run.data.tokenizer:
        tokenizer = ChatTokenizer.from_file(run.data.tokenizer)
    elif own.exists():
        tokenizer = ChatTokenizer.from_file(own)
    else:
        if info.is_main:
            assert run.data.train_data is not None
            conversations = read_conversations(run.data.train_data).conversations
            texts = conversation_texts(conversations)
            train_bpe_tokenizer(texts, vocab_size=run.model.vocab_size).save(own)
            log(info, f"trained a byte-level BPE tokenizer (vocab {run.model.vocab_size}) -> {own}")
        barrier()
        tokenizer = ChatTokenizer.from_file(own)
    if info.is_main and not own.exists():
        tokenizer.save(own)
    return tokenizer


def fit_vocab(run: RunConfig, tokenizer: ChatTokenizer, info: DistInfo) -> None:
    """The embedding must cover the tokenizer; it is padded up to a multiple of 64 for fast matmuls."""
    if tokenizer.vocab_size > run.model.vocab_size:
        padded = -(-tokenizer.vocab_size // 64) * 64
        log(info, f"tokenizer has {tokenizer.vocab_size} tokens: model vocab {run.model.vocab_size} -> {padded}")
        run.model.vocab_size = padded


def report_skipped(name: str, data: ChatDataset, info: DistInfo) -> None:
    if data.skipped and info.is_main:
        shown = ", ".join(f"line {s.line_no} ({s.code}: {s.reason})" for s in data.skipped[:5])
        more = f" and {len(data.skipped) - 5} more" if len(data.skipped) > 5 else ""
        print(f"{name}: skipped {len(data.skipped)} malformed line(s): {shown}{more}", file=sys.stderr, flush=True)


def total_steps_for(run: RunConfig, batches: BatchIterator) -> int:
    if run.train.max_steps is not None:
        return run.train.max_steps
    steps = run.train.epochs * batches.batches_per_epoch // run.train.grad_accum
    if steps < 1:
        raise ConfigError(
            "E002", "the training data does not fill one optimizer step", "lower --grad-accum or --batch-size"
        )
    return steps


def build_callbacks(run: RunConfig, run_dir: Path) -> list[Callback]:
    callbacks: list[Callback] = [
        ConsoleLogger(progress_bar=run.logging.progress_bar),
        JsonlLogger(run_dir / METRICS_FILE),
    ]
    if run.logging.tensorboard:
        callbacks.append(TensorBoardLogger(run_dir / TENSORBOARD_DIR))
    return callbacks


def check_resumable(saved: dict[str, Any] | None, run: RunConfig) -> None:
    if saved is not None and saved.get("model") != config_to_dict(run.model):
        raise CheckpointError(
            "E303",
            "the checkpoint was trained with a different model architecture than this run's config",
            "resume with the same --preset/--config-file (see config.yaml in the run directory)",
        )


@dataclass
class PreparedData:
    batches: BatchIterator
    eval_data: PackedDataset | None
    total_steps: int
    description: str


def prepare_data(run: RunConfig, run_dir: Path, info: DistInfo) -> PreparedData:
    """Tokenizer, packed train/eval rows, this rank's resumable batches, and the number of optimizer steps."""
    assert run.data.train_data is not None
    tokenizer = prepare_tokenizer(run, run_dir, info)
    fit_vocab(run, tokenizer, info)
    train_data, eval_data = build_datasets(
        run.data.train_data, run.data.eval_data, tokenizer=tokenizer, seq_len=run.seq_len, train_on=run.data.train_on
    )
    report_skipped("train", train_data, info)
    if eval_data is not None:
        report_skipped("eval", eval_data, info)
    sampler = ShardedSampler(len(train_data.rows), rank=info.rank, world_size=info.world_size, seed=run.train.seed)
    epochs = None if run.train.max_steps is not None else run.train.epochs
    batches = BatchIterator(train_data.rows, sampler, micro_batch_size=run.train.micro_batch_size, num_epochs=epochs)
    description = f"{train_data.num_conversations} conversations -> {len(train_data.rows)} rows of {run.seq_len} tokens"
    return PreparedData(
        batches=batches,
        eval_data=PackedDataset(eval_data.rows) if eval_data is not None else None,
        total_steps=total_steps_for(run, batches),
        description=description,
    )


def build_trainer(run: RunConfig, run_dir: Path, info: DistInfo, data: PreparedData, engine: Any) -> Trainer:
    settings = LoopSettings(
        total_steps=data.total_steps,
        log_every=run.logging.log_every_n_batches,
        eval_every=run.train.eval_every_n_batches,
        save_every=run.checkpoint.save_every_n_batches,
        early_stopping_patience=run.train.early_stopping_patience,
    )
    return Trainer(
        engine=engine,
        batches=data.batches,
        eval_data=data.eval_data,
        info=info,
        settings=settings,
        checkpoints=CheckpointManager(run_dir, run.checkpoint, info),
        callbacks=build_callbacks(run, run_dir) if info.is_main else [],
        client_extra={"config": config_to_dict(run)},
    )


def resume_if_asked(trainer: Trainer, run: RunConfig, info: DistInfo) -> None:
    resume = trainer.checkpoints.find_resume()
    if resume is None:
        return
    client_state = trainer.checkpoints.load(trainer.engine, *resume)
    check_resumable(client_state.get("config"), run)
    trainer.restore(client_state)
    log(info, f"resumed from {resume[0] / resume[1]} at step {trainer.state.step}")


def train(run: RunConfig) -> dict[str, Any]:
    """Run training as configured; every rank calls this. Returns the summary (steps, final eval loss, ...)."""
    run.validate()
    if not run.data.train_data:
        raise ConfigError("E002", "no training data given", "pass --train-data FILE.jsonl")
    precision = select_precision(run.train.precision)  # E003 before any process group or data work
    info = init_distributed()
    run_dir = Path(run.logging.output_dir) / run.logging.experiment_name
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    data = prepare_data(run, run_dir, info)
    if info.is_main:
        save_config(run, run_dir / CONFIG_FILE)
    log(info, f"run dir {run_dir} | {data.description} | {info.world_size} process(es) on {info.device}")
    torch.manual_seed(run.train.seed)  # identical initial weights on every rank
    bundle = build_engine(run.model.build(), run, info=info, total_steps=data.total_steps, precision=precision)
    dist_cfg = run.distributed
    log(
        info,
        f"precision {precision} | ZeRO {dist_cfg.zero_stage} | EP {dist_cfg.expert_parallel_size} | "
        f"{data.total_steps} steps",
    )
    trainer = build_trainer(run, run_dir, info, data, bundle.engine)
    resume_if_asked(trainer, run, info)
    summary = trainer.fit()
    summary["run_dir"] = str(run_dir)
    return summary
