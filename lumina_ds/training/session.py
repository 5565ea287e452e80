"""One training run end to end: run dir, tokenizer, data, model, engine, resume, loop."""

from __future__ import annotations

import contextlib
import gc
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from lumina_ds.config.io import config_to_dict, save_config
from lumina_ds.config.run import RunConfig
from lumina_ds.data.checks import LineLimit
from lumina_ds.data.documents import check_input_files, parse_train_data
from lumina_ds.data.packing import PackedDataset
from lumina_ds.data.pipeline import SourceSet, build_batches, eval_rows, micro_batches_for_epochs, open_sources
from lumina_ds.data.prepare import EncodeSettings, PrepareReport
from lumina_ds.data.profile import LoaderRate, measure_batches
from lumina_ds.data.sources import record_format_of
from lumina_ds.data.stream import PackedBatches
from lumina_ds.data.tokenizer import ChatTokenizer, sample_texts, train_bpe_tokenizer
from lumina_ds.distributed.collectives import any_rank, min_over_ranks, shared_by_all_ranks
from lumina_ds.distributed.ds_config import select_precision
from lumina_ds.distributed.env import DistInfo, barrier, init_distributed
from lumina_ds.distributed.preflight import preflight
from lumina_ds.errors import CheckpointError, ConfigError
from lumina_ds.hf.source import open_model_source
from lumina_ds.models.counting import count_parameters
from lumina_ds.models.transformer import Transformer
from lumina_ds.monitor.callbacks import Callback, ConsoleLogger, JsonlLogger, MoESummary, TensorBoardLogger
from lumina_ds.monitor.report import RunReport
from lumina_ds.monitor.speed import Throughput
from lumina_ds.monitor.wandb_logger import WandbLogger, import_wandb
from lumina_ds.run_dir import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    DS_CONFIG_FILE,
    METRICS_FILE,
    TENSORBOARD_DIR,
    TOKENIZER_FILE,
    RunLock,
    list_complete_tags,
)
from lumina_ds.training.backoff import StepOutOfMemoryError, apply_recorded_backoff, back_off
from lumina_ds.training.checkpoint import CheckpointManager
from lumina_ds.training.elastic import plan_elastic_resume
from lumina_ds.training.engine import build_engine, build_model, optimizer_name
from lumina_ds.training.faults import FaultPlan
from lumina_ds.training.guard import DivergenceGuard
from lumina_ds.training.init_from import load_initial_weights
from lumina_ds.training.profiling import profiling_callbacks
from lumina_ds.training.resume import apply_changed_settings
from lumina_ds.training.train_step import Engine, TrainStep
from lumina_ds.training.trainer import Trainer

TOKENIZER_SAMPLE_BYTES = 200 * 10**6  # text the BPE trainer sees at most


def log(info: DistInfo, message: str) -> None:
    if info.is_main:
        print(message, flush=True)


def prepare_tokenizer(run: RunConfig, info: DistInfo) -> ChatTokenizer:
    """An explicit --tokenizer; else the run's own (a resumed run keeps its vocabulary); else train a BPE."""
    own = run.logging.run_dir / TOKENIZER_FILE
    existed = own.exists()
    barrier()  # every rank looks before rank 0 may write it, so all ranks take the same branch below
    if run.data.tokenizer:
        tokenizer = ChatTokenizer.from_file(run.data.tokenizer)
    elif existed:
        tokenizer = ChatTokenizer.from_file(own)
    else:
        if info.is_main:
            assert run.data.train_data is not None
            locations = [spec.source.location for spec in parse_train_data(run.data.train_data)]
            limit = LineLimit(record_format=record_format_of(run.data))
            texts = sample_texts(locations, max_bytes=TOKENIZER_SAMPLE_BYTES, limit=limit)
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


def report_skipped(report: PrepareReport, info: DistInfo) -> None:
    if report.skipped and info.is_main:
        shown = ", ".join(f"line {s.line_no} ({s.code}: {s.reason})" for s in report.skipped_examples[:5])
        more = f" and {report.skipped - 5} more" if report.skipped > 5 else ""
        print(
            f"{report.source}: skipped {report.skipped} malformed line(s): {shown}{more}", file=sys.stderr, flush=True
        )


def total_steps_for(run: RunConfig, sources: SourceSet, batches: PackedBatches, info: DistInfo) -> tuple[int, str]:
    """Optimizer steps: --max-steps, or the epochs' global rows over the global batch."""
    if run.train.max_steps is not None:
        return run.train.max_steps, f"{run.train.max_steps} steps"
    micro = micro_batches_for_epochs(
        sources,
        batches.view.mixture,
        epochs=run.train.epochs,
        world_size=info.world_size,
        seq_len=run.seq_len,
        micro_batch_size=run.train.micro_batch_size,
    )
    steps = micro // run.train.grad_accum
    if steps < 1:
        raise ConfigError(
            "E002", "the training data does not fill one optimizer step", "lower --grad-accum or --batch-size"
        )
    return steps, f"{run.train.epochs} epoch(s) = {steps} steps"


def build_callbacks(run: RunConfig, *, world_size: int) -> list[Callback]:
    run_dir, logging = run.logging.run_dir, run.logging
    flops_per_token = count_parameters(run.model, seq_len=run.seq_len).flops_per_token  # as benchmarks/throughput.py
    callbacks: list[Callback] = [
        MoESummary(),  # first: they add the figures the loggers show
        Throughput(flops_per_token=flops_per_token, world_size=world_size, peak_tflops=logging.peak_tflops),
        ConsoleLogger(progress_bar=logging.progress_bar),
        JsonlLogger(run_dir / METRICS_FILE),
    ]
    if logging.tensorboard:
        callbacks.append(TensorBoardLogger(run_dir / TENSORBOARD_DIR))
    if logging.wandb:
        callbacks.append(WandbLogger(config=config_to_dict(run), run_dir=run_dir, project=logging.wandb_project,
                                     entity=logging.wandb_entity, name=logging.wandb_run_name))  # fmt: skip
    callbacks.append(RunReport(run_dir / METRICS_FILE))  # report.png at the end, signal stops too; never fails the run
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
    batches: PackedBatches
    eval_data: PackedDataset | None
    total_steps: int
    description: str


def shard_builder(prepared_dir: Path, info: DistInfo) -> bool:
    """Whether this rank builds missing prepared shards: global rank 0 when every rank sees the same directory (one
    build for the job), else local rank 0 of each node (node-local disks each need their copy). Collective."""
    if info.local_rank == 0:
        prepared_dir.mkdir(parents=True, exist_ok=True)
    if shared_by_all_ranks(prepared_dir, rank=info.rank):
        return info.rank == 0
    log(info, f"{prepared_dir} is not shared by every node: local rank 0 of each node prepares its own shards")
    return info.local_rank == 0


def check_run_dir_shared(run_dir: Path, info: DistInfo) -> None:
    """Rank 0 writes the tokenizer and checkpoint markers every rank reads: all ranks must see one run directory."""
    if not shared_by_all_ranks(run_dir, rank=info.rank):
        raise ConfigError(
            "E003",
            f"the run directory {run_dir} is not shared by the {info.world_size} ranks: ranks on other nodes do not "
            "see the files rank 0 writes there (the tokenizer, checkpoints and their complete.json)",
            "put --output-dir on a file system every node mounts at the same path (NFS, Lustre, GPFS, ...)",
        )


def prepare_data(run: RunConfig, info: DistInfo) -> PreparedData:
    """Tokenizer, training sources by strategy, this rank's resumable batches, eval rows, optimizer steps."""
    assert run.data.train_data is not None
    tokenizer = prepare_tokenizer(run, info)
    fit_vocab(run, tokenizer, info)
    encode = EncodeSettings.of(
        tokenizer,
        train_on=run.data.train_on,
        strict=run.data.strict,
        max_line_bytes=run.data.max_line_bytes,
        truncate_long=run.data.truncate_long,
        record_format=record_format_of(run.data),
    )
    sources = open_sources(
        parse_train_data(run.data.train_data),
        encode,
        run.data,
        prepared_dir=run.prepared_dir,
        local_world_size=info.local_world_size,
        is_local_main=info.local_rank == 0,
        available_ram=min_over_ranks(psutil.virtual_memory().available),
        shard_builder=lambda: shard_builder(run.prepared_dir, info),
        barrier=barrier,
    )
    log(info, f"data strategy: {sources.strategy} ({sources.reason})")
    for report in sources.reports:
        log(info, report.summary())
        report_skipped(report, info)
    batches = build_batches(
        sources,
        seed=run.train.seed,
        rank=info.rank,
        world_size=info.world_size,
        seq_len=run.seq_len,
        pad_id=tokenizer.pad_id,
        micro_batch_size=run.train.micro_batch_size,
        data=run.data,
    )
    eval_data = None
    if run.data.eval_data:
        rows, report = eval_rows(run.data.eval_data, encode, seq_len=run.seq_len, pad_id=tokenizer.pad_id)
        report_skipped(report, info)
        eval_data = PackedDataset(rows)
    total_steps, steps_text = total_steps_for(run, sources, batches, info)
    files = ", ".join(f"{spec.source.stem} x{spec.weight:g}" for spec in sources.specs)
    description = f"{files} | {batches.view.mixture.docs_per_epoch:,} lines/epoch | {steps_text}"
    return PreparedData(batches=batches, eval_data=eval_data, total_steps=total_steps, description=description)


def build_trainer(run: RunConfig, info: DistInfo, data: PreparedData, engine: Engine) -> Trainer:
    guard = DivergenceGuard(run.train.guard, vocab_size=run.model.vocab_size) if run.train.guard.enabled else None
    step = TrainStep(engine, guard=guard, faults=FaultPlan.from_env(rank=info.rank))
    profilers = profiling_callbacks(run.logging, step=step) if info.is_main else []  # rank 0 measures
    return Trainer(
        step=step,
        batches=data.batches,
        eval_data=data.eval_data,
        info=info,
        total_steps=data.total_steps,
        train=run.train,
        logging=run.logging,
        checkpoints=CheckpointManager(run.logging.run_dir, run.checkpoint, info),
        callbacks=build_callbacks(run, world_size=info.world_size) + profilers if info.is_main else [],
        config_record=config_to_dict(run),
    )


def resume_if_asked(trainer: Trainer, run: RunConfig, info: DistInfo) -> None:
    """Resume from the newest checkpoint that verifies (--resume / --auto-resume), applying changed settings."""
    if info.is_main:
        trainer.checkpoints.recover()  # finish or undo a save a kill interrupted
    barrier()
    resumed = trainer.checkpoints.load(trainer.engine, log=lambda message: log(info, message))
    if resumed is None:
        return
    check_resumable(resumed.config, run)
    for change in apply_changed_settings(trainer.engine, run, resumed.config, trainer.total_steps):
        log(info, f"resume: {change}")
    trainer.restore(resumed)
    log(info, f"resumed from {resumed.tag_dir} at step {trainer.state.step}")


def train(run: RunConfig) -> dict[str, Any]:
    """Run training as configured; every rank calls this. Returns the summary (steps, final eval loss, ...)."""
    run.validate()
    check_input_files(run.data)  # E104 before any tokenizer is trained or data tokenized
    precision = select_precision(run.train.precision)  # E003 before any process group or data work
    if run.logging.wandb:
        import_wandb()  # E003 with the install hint before any work
    info = init_distributed(timeout_minutes=run.distributed.timeout_minutes)
    preflight(run, info.world_size)  # E203 before any data or model work
    run_dir = run.logging.run_dir
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    check_run_dir_shared(run_dir, info)  # collective: every rank raises together
    with run_lock(run_dir, info):
        summary = train_in(run, info, precision)
    summary["run_dir"] = str(run_dir)
    return summary


@contextlib.contextmanager
def run_lock(run_dir: Path, info: DistInfo) -> Iterator[None]:
    """Rank 0 holds the run directory's lock for the whole run; every rank stops together when it is taken (E305)."""
    lock, problem = RunLock(run_dir), None
    if info.is_main:
        try:
            warning = lock.acquire()
            if warning:
                log(info, f"warning: {warning}")
        except CheckpointError as exc:
            problem = exc
    if any_rank(problem is not None):
        raise problem or CheckpointError("E305", f"rank 0 could not take the lock of {run_dir}", "see rank 0's error")
    try:
        yield
    finally:
        lock.release()


def train_in(run: RunConfig, info: DistInfo, precision: str) -> dict[str, Any]:
    """The run inside its locked run directory. A step that runs out of memory shrinks the micro-batch (same global
    batch) and, in a single process, restarts from the last checkpoint with a new engine (see training/backoff.py)."""
    change = apply_recorded_backoff(run, world_size=info.world_size)
    if change:
        log(info, change)
    while True:
        try:
            return train_attempt(run, info, precision)
        except StepOutOfMemoryError as exc:  # leaving this block drops the traceback, and with it the engine
            error = exc.message
        log(info, back_off(run, world_size=info.world_size, error=error))  # E204 with several ranks, or at the floor
        release_memory()
        if list_complete_tags(run.logging.run_dir / CHECKPOINTS_DIR):
            run.checkpoint.resume, run.checkpoint.auto_resume = None, True  # the newest verified tag of this run


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def init_weights_if_asked(model: Transformer, run: RunConfig, info: DistInfo) -> None:
    """--init-from: the source's weights, at a fresh start only (a resumed run continues from its checkpoint)."""
    path = run.checkpoint.init_from
    if not path:
        return
    if CheckpointManager(run.logging.run_dir, run.checkpoint, info).candidates():
        log(info, f"--init-from {path} not used: this run resumes from its own checkpoint")
        return
    source = open_model_source(path)
    copied = load_initial_weights(model, source, rank=info.rank)
    log(info, f"initialised from {source.path} ({source.kind}): {copied:,} weights copied on rank 0; fresh optimizer")


def train_attempt(run: RunConfig, info: DistInfo, precision: str) -> dict[str, Any]:
    """Data, model, engine, resume, loop."""
    run_dir = run.logging.run_dir
    data = prepare_data(run, info)
    if info.is_main:
        save_config(run, run_dir / CONFIG_FILE)
    log(info, f"run dir {run_dir} | {data.description} | {info.world_size} process(es) on {info.device}")
    torch.manual_seed(run.train.seed)  # identical initial weights on every rank
    elastic = plan_elastic_resume(run, info, log=lambda message: log(info, message))  # before the engine: see there
    model = build_model(run, world_size=info.world_size, precision=precision)  # partitioned at ZeRO-3
    if elastic is None:
        init_weights_if_asked(model, run, info)
    bundle = build_engine(model, run, info=info, total_steps=data.total_steps, precision=precision,
                          load_universal=elastic is not None)  # fmt: skip
    optimizer = optimizer_name(run, precision)
    if info.is_main:  # the JSON DeepSpeed got, and (under our own key, which DeepSpeed never sees) what steps it
        record = {**bundle.ds_config, "lumina_ds": {"optimizer": optimizer, "precision": precision}}
        (run_dir / DS_CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    dist_cfg = run.distributed
    log(
        info,
        f"precision {precision} | ZeRO {dist_cfg.zero_stage} | EP {dist_cfg.expert_parallel_size} | "
        f"offload {dist_cfg.offload} | optimizer {optimizer} | {data.total_steps} steps",
    )
    trainer = build_trainer(run, info, data, bundle.engine)
    trainer.checkpoints.elastic = elastic
    resume_if_asked(trainer, run, info)
    try:
        return trainer.fit()
    finally:
        trainer.checkpoints.wait_for_backup()  # rank 0's copy in progress is verified before the process exits


def profile_data_loading(run: RunConfig, *, batches: int = 200) -> LoaderRate:
    """Build this run's data pipeline and time its batches, without a model (`--profile-data-loading`)."""
    run.validate()
    check_input_files(run.data)
    info = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
    run.logging.run_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(run, info)
    log(info, data.description)
    rate = measure_batches(data.batches, count=batches)
    log(info, f"data loading: {rate.summary()}")
    return rate
