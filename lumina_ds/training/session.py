"""One training run end to end: run dir and lock, tokenizer, data, the tag to resume from, model, engine, loop."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lumina_ds.config.changes import revise
from lumina_ds.config.io import config_to_dict, save_config
from lumina_ds.config.run import RunConfig
from lumina_ds.data.train_data import (
    Batching,
    DataWorld,
    LoaderRate,
    TrainData,
    build_train_data,
    check_input_files,
    measure_batches,
    training_texts,
)
from lumina_ds.distributed.collectives import all_gather_object, any_rank, min_over_ranks, shared_by_all_ranks
from lumina_ds.distributed.ds_config import select_precision
from lumina_ds.distributed.env import DistInfo, barrier, init_distributed
from lumina_ds.distributed.nvme import swap_space
from lumina_ds.distributed.peers import lost_peer_error, where_ranks_run
from lumina_ds.distributed.preflight import preflight
from lumina_ds.errors import CheckpointError, ConfigError, DataError, LuminaError, MemoryPlanError
from lumina_ds.hf.source import open_model_source
from lumina_ds.models.counting import count_parameters
from lumina_ds.models.moe import DROPLESS_IMBALANCE, rank_load_imbalance
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
from lumina_ds.tokenizer import ChatTokenizer, train_bpe_tokenizer
from lumina_ds.training.backoff import StepOutOfMemoryError, apply_recorded_backoff, back_off
from lumina_ds.training.checkpoint import CheckpointManager, PlainLoader, TagLoader, choose_resume_tag
from lumina_ds.training.checkpoint_state import load_rank_state
from lumina_ds.training.elastic import Layout, check_layout, tag_loader_for
from lumina_ds.training.engine import EngineBundle, build_engine, build_model, optimizer_name
from lumina_ds.training.faults import FaultPlan
from lumina_ds.training.guard import DivergenceGuard
from lumina_ds.training.init_from import load_initial_weights
from lumina_ds.training.profiling import profiling_callbacks
from lumina_ds.training.resume import apply_changed_settings
from lumina_ds.training.resume_checks import check_architecture, check_tokenizer, resume_tokenizer, saved_state
from lumina_ds.training.tag_weights import writes_weights_later
from lumina_ds.training.train_module import TrainModule, is_out_of_memory
from lumina_ds.training.trainer import Trainer

TOKENIZER_SAMPLE_BYTES = 200 * 10**6  # text the BPE trainer sees at most


def log(info: DistInfo, message: str) -> None:
    if info.is_main:
        print(message, flush=True)


def resolved(run: RunConfig) -> RunConfig:
    """A config as `lumina-ds train` resolves it: validated once, its input files checked, frozen. A frozen config
    was resolved already."""
    if run.frozen:
        return run
    run.validate()
    check_input_files(run.data)  # E104 before any tokenizer is trained or data tokenized
    run.freeze()
    return run


def prepare_tokenizer(run: RunConfig, info: DistInfo, resume_tag: Path | None) -> tuple[ChatTokenizer, str]:
    """The tokenizer and where it came from: an explicit --tokenizer; else, resuming, the run's own or the tag's copy
    (never a new one); else the run's own; else a BPE trained on the data (a fresh start)."""
    own = run.logging.run_dir / TOKENIZER_FILE
    if run.data.tokenizer:
        return ChatTokenizer.from_file(run.data.tokenizer), f"--tokenizer {run.data.tokenizer}"
    if resume_tag is not None:
        return resume_tokenizer(own, resume_tag, log=lambda message: log(info, message)), str(own)
    existed = own.exists()
    barrier()  # every rank looks before rank 0 may write it, so all ranks take the same branch below
    if not existed:
        if info.is_main:
            texts = training_texts(run.data, max_bytes=TOKENIZER_SAMPLE_BYTES)
            train_bpe_tokenizer(texts, vocab_size=run.model.vocab_size).save(own)
            log(info, f"trained a byte-level BPE tokenizer (vocab {run.model.vocab_size}) -> {own}")
        barrier()
    try:
        return ChatTokenizer.from_file(own), str(own)
    except LuminaError as exc:
        raise DataError("E115", exc.message, f"this run has no checkpoint to restore it from: delete {own} to train "
                        "a new tokenizer on the data, or pass --tokenizer") from exc  # fmt: skip


def install_tokenizer(tokenizer: ChatTokenizer, own: Path) -> None:
    """Rank 0, once a resume is accepted: the run directory holds the tokenizer the run trains with (chat and export
    read it there). A different or unreadable file there is kept beside it, renamed."""
    if own.exists():
        try:
            if ChatTokenizer.from_file(own).identity() == tokenizer.identity():
                return
        except LuminaError:
            pass
        os.replace(own, own.with_name(f"{own.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"))
    staging = own.parent / f".tokenizer.{os.getpid()}.tmp"
    tokenizer.save(staging / own.name)  # with a model's chat template files beside it
    for path in sorted(staging.iterdir()):
        os.replace(path, own.parent / path.name)
    staging.rmdir()


def fit_vocab(run: RunConfig, tokenizer: ChatTokenizer, info: DistInfo) -> RunConfig:
    """The embedding must cover the tokenizer; it is padded up to a multiple of 64 for fast matmuls."""
    if tokenizer.vocab_size <= run.model.vocab_size:
        return run
    padded = -(-tokenizer.vocab_size // 64) * 64
    log(info, f"tokenizer has {tokenizer.vocab_size} tokens: model vocab {run.model.vocab_size} -> {padded}")
    return revise(run, {"model.vocab_size": padded}, reason="the tokenizer's vocabulary")


def data_world(info: DistInfo) -> DataWorld:
    return DataWorld(rank=info.rank, world_size=info.world_size, local_rank=info.local_rank,
                     local_world_size=info.local_world_size, barrier=barrier, least_free_ram=min_over_ranks,
                     shared=lambda path: shared_by_all_ranks(path, rank=info.rank),
                     log=lambda message: log(info, message), all_gather=all_gather_object)  # fmt: skip


def batching_of(run: RunConfig) -> Batching:
    train = run.train
    return Batching(seq_len=run.seq_len, micro_batch_size=train.micro_batch_size, grad_accum=train.grad_accum,
                    seed=train.seed, epochs=train.epochs, max_steps=train.max_steps)  # fmt: skip


def prepare_data(run: RunConfig, tokenizer: ChatTokenizer, info: DistInfo) -> TrainData:
    """This rank's batches and the evaluation rows."""
    return build_train_data(run.data, tokenizer, batching_of(run), prepared_dir=run.prepared_dir,
                            world=data_world(info))  # fmt: skip


def build_callbacks(run: RunConfig, *, world_size: int) -> list[Callback]:
    run_dir, logging = run.logging.run_dir, run.logging
    flops_per_token = count_parameters(run.model, seq_len=run.seq_len).flops_per_token  # as benchmarks/throughput.py
    callbacks: list[Callback] = [
        MoESummary(
            expert_parallel_size=run.distributed.expert_parallel_size,
            planned_load=DROPLESS_IMBALANCE,
            rank_load=rank_load_imbalance,
        ),  # first: they add the figures the loggers show
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


def check_run_dir_shared(run_dir: Path, info: DistInfo) -> None:
    """Rank 0 writes the tokenizer and checkpoint markers every rank reads: all ranks must see one run directory."""
    if not shared_by_all_ranks(run_dir, rank=info.rank):
        raise ConfigError(
            "E003",
            f"the run directory {run_dir} is not shared by the {info.world_size} ranks: ranks on other nodes do not "
            "see the files rank 0 writes there (the tokenizer, checkpoints and their complete.json)",
            "put --output-dir on a file system every node mounts at the same path (NFS, Lustre, GPFS, ...)",
        )


def train(run: RunConfig, *, force_unlock: bool = False) -> dict[str, Any]:
    """Run training as configured; every rank calls this; `force_unlock` breaks the run directory's lock whoever
    holds it (--force-unlock). Returns the summary (steps, final eval loss, ...)."""
    run = resolved(run)
    precision = select_precision(run.train.precision)  # E003 before any process group or data work
    if run.logging.wandb:
        import_wandb()  # E003 with the install hint before any work
    info = init_distributed(timeout_minutes=run.distributed.timeout_minutes)
    preflight(run, info.world_size)  # E203 before any data or model work
    run_dir = run.logging.run_dir
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    check_run_dir_shared(run_dir, info)  # collective: every rank raises together
    peers = where_ranks_run()  # so that a lost connection names the ranks it lost (E308)
    try:
        with (
            run_lock(run_dir, info, force=force_unlock),
            swap_space(run.distributed, experiment=run.logging.experiment_name, rank=info.rank),
        ):
            summary = train_in(run, info, precision)
    except RuntimeError as exc:
        lost = lost_peer_error(exc, peers, rank=info.rank)
        if lost is None:
            raise
        raise lost from exc
    summary["run_dir"] = str(run_dir)
    return summary


@contextlib.contextmanager
def run_lock(run_dir: Path, info: DistInfo, *, force: bool = False) -> Iterator[None]:
    """Rank 0 holds the run directory's lock (a lease it renews) for the whole run; every rank stops together when
    it is taken (E305). `force` (--force-unlock) breaks whatever lock is there."""
    lock, problem = RunLock(run_dir), None
    if info.is_main:
        try:
            warning = lock.acquire(force=force)
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
    batch) and, in a single process, restarts from the last checkpoint with a new engine (see training/backoff.py).
    The fault plan is one per run, so that a one-shot fault stays spent when the engine is rebuilt."""
    faults = FaultPlan.from_env(rank=info.rank)
    say = lambda message: log(info, message)  # noqa: E731
    run = apply_recorded_backoff(run, world_size=info.world_size, log=say)
    while True:
        try:
            return train_attempt(run, info, precision, faults)
        except StepOutOfMemoryError as exc:  # leaving this block drops the traceback, and with it the engine
            error = exc.message
        run = back_off(run, world_size=info.world_size, error=error, log=say)  # E204 with several ranks, or floor
        release_memory()
        if list_complete_tags(run.logging.run_dir / CHECKPOINTS_DIR):
            run = revise(run, {"checkpoint.resume": None, "checkpoint.auto_resume": True},
                         reason="the backoff restarts from this run's newest verified tag", log=say)  # fmt: skip


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def init_weights(model: Transformer, run: RunConfig, info: DistInfo) -> None:
    """--init-from: the source's weights, at a fresh start only (a resumed run continues from its checkpoint)."""
    if not run.checkpoint.init_from:
        return
    source = open_model_source(run.checkpoint.init_from)
    copied = load_initial_weights(model, source, rank=info.rank)
    log(info, f"initialised from {source.path} ({source.kind}): {copied:,} weights copied on rank 0; fresh optimizer")


@dataclass
class OpenedRun:
    """A run past every check a resume makes, with nothing in its run directory changed yet."""

    run: RunConfig
    tokenizer: ChatTokenizer
    data: TrainData
    resume_tag: Path | None  # the verified tag to resume from; None for a fresh start
    loader: TagLoader


def open_run(run: RunConfig, info: DistInfo) -> OpenedRun:
    """The tag to resume from and the tokenizer, then every check a resume makes (tokenizer identity, architecture,
    ZeRO stage and sizes, then the data fingerprint once the data is open), then the loader the tag needs."""
    say = lambda message: log(info, message)  # noqa: E731
    tag = choose_resume_tag(run.logging.run_dir, run.checkpoint, info, log=say)
    tokenizer, source = prepare_tokenizer(run, info, tag)
    run = fit_vocab(run, tokenizer, info)
    if tag is not None:
        saved = saved_state(tag)
        check_tokenizer(saved["tokenizer"], tokenizer, source, tag)
        check_architecture(saved["config"], run, tag, log=say)
        check_layout(tag, run, info)
    data = prepare_data(run, tokenizer, info)
    if tag is None:
        return OpenedRun(run, tokenizer, data, None, PlainLoader(info))
    warning = data.batches.check_resumable(load_rank_state(tag, rank=0)["data"])  # the position is global
    if warning:
        say(warning)
    return OpenedRun(run, tokenizer, data, tag, tag_loader_for(tag, run, info, log=say))


def train_attempt(run: RunConfig, info: DistInfo, precision: str, faults: FaultPlan) -> dict[str, Any]:
    """Checks, data, model, engine, resume; then the run directory records the run; then the loop."""
    opened = open_run(run, info)
    run, data, resume_tag = opened.run, opened.data, opened.resume_tag
    log(info, f"run dir {run.logging.run_dir} | {data.description} | {info.world_size} process(es) on {info.device}")
    bundle = build_engine_or_e204(opened, info, precision, faults)
    optimizer = optimizer_name(run, precision)
    dist_cfg = run.distributed
    log(info, f"precision {precision} | ZeRO {dist_cfg.zero_stage} | EP {dist_cfg.expert_parallel_size} | "
              f"offload {dist_cfg.offload} | optimizer {optimizer} | {data.total_steps} steps")  # fmt: skip
    later = writes_weights_later(Layout.of(config_to_dict(run), info.world_size))
    checkpoints = CheckpointManager(run.logging.run_dir, run.checkpoint, info, loader=opened.loader,
                                    resume_from=resume_tag, tokenizer=opened.tokenizer,
                                    weights_later=later)  # fmt: skip
    trainer = build_trainer(run, info, data, TrainModule(bundle.engine, guard=guard_of(run), faults=faults),
                            checkpoints)  # fmt: skip
    resume(trainer, checkpoints, run, info)
    if info.is_main:  # only now: a refused resume leaves the run directory as it was
        record_run(run, opened.tokenizer, {**bundle.ds_config, "lumina_ds": {"optimizer": optimizer,
                                                                            "precision": precision}})  # fmt: skip
    try:
        return trainer.fit()
    finally:
        checkpoints.wait_for_backup()  # rank 0's copy in progress is verified before the process exits


def build_engine_or_e204(opened: OpenedRun, info: DistInfo, precision: str, faults: FaultPlan) -> EngineBundle:
    """The model (with --init-from's weights at a fresh start) and its DeepSpeed engine; running out of memory on the
    way is E204 naming the layout and what to change, not a traceback."""
    run = opened.run
    try:
        faults.building_engine()
        torch.manual_seed(run.train.seed)  # identical initial weights on every rank
        model = build_model(run, world_size=info.world_size, precision=precision)  # partitioned at ZeRO-3
        if opened.resume_tag is None:
            init_weights(model, run, info)
        elif run.checkpoint.init_from:
            log(info, f"--init-from {run.checkpoint.init_from} not used: this run resumes from its own checkpoint")
        return build_engine(model, run, info=info, total_steps=opened.data.total_steps, precision=precision,
                            load_universal=opened.loader.universal)  # fmt: skip
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        dist = run.distributed
        raise MemoryPlanError(
            "E204",
            f"out of memory building the model and its DeepSpeed engine (ZeRO-{dist.zero_stage}, EP "
            f"{dist.expert_parallel_size}, offload {dist.offload}, {info.world_size} process(es)): "
            f"{str(exc).strip().splitlines()[0][:200]}",
            "shard the model states further: --zero-stage 3, --offload optimizer or optimizer+params, a larger "
            "--expert-parallel-size, or more GPUs (`lumina-ds plan --preset ... --nodes N` shows a layout that fits)",
        ) from None


def record_run(run: RunConfig, tokenizer: ChatTokenizer, ds_record: dict[str, Any]) -> None:
    """config.yaml, the tokenizer, and the JSON DeepSpeed got (with, under our own key that DeepSpeed never sees,
    what steps it), each replaced whole."""
    run_dir = run.logging.run_dir
    save_config(run, run_dir / CONFIG_FILE)
    install_tokenizer(tokenizer, run_dir / TOKENIZER_FILE)
    staged = run_dir / f".{DS_CONFIG_FILE}.{os.getpid()}.tmp"
    staged.write_text(json.dumps(ds_record, indent=2) + "\n")
    os.replace(staged, run_dir / DS_CONFIG_FILE)


def guard_of(run: RunConfig) -> DivergenceGuard | None:
    return DivergenceGuard(run.train.guard, vocab_size=run.model.vocab_size) if run.train.guard.enabled else None


def build_trainer(run: RunConfig, info: DistInfo, data: TrainData, module: TrainModule,
                  checkpoints: CheckpointManager) -> Trainer:  # fmt: skip
    profilers = profiling_callbacks(run.logging, module=module) if info.is_main else []  # rank 0 measures
    return Trainer(
        module=module,
        batches=data.batches,
        eval_data=data.eval_data,
        info=info,
        total_steps=data.total_steps,
        train=run.train,
        logging=run.logging,
        checkpoints=checkpoints,
        callbacks=build_callbacks(run, world_size=info.world_size) + profilers if info.is_main else [],
        config_record=config_to_dict(run),
    )


def resume(trainer: Trainer, checkpoints: CheckpointManager, run: RunConfig, info: DistInfo) -> None:
    """Load the chosen tag into the engine and the trainer, and apply the optimisation settings the flags changed."""
    resumed = checkpoints.resume(trainer.module.engine)
    if resumed is None:
        return
    for change in apply_changed_settings(trainer.module.engine, run, resumed.config, trainer.total_steps):
        log(info, f"resume: {change}")
    trainer.restore(resumed)
    checkpoints.set_aside_newer(resumed.tag_dir, log=lambda message: log(info, message))  # after the restore
    log(info, f"resumed from {resumed.tag_dir} at step {trainer.state.step}")


def profile_data_loading(run: RunConfig, *, batches: int = 200) -> LoaderRate:
    """Build this run's data pipeline and time its batches, without a model (`--profile-data-loading`)."""
    run = resolved(run)
    info = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
    run.logging.run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, _ = prepare_tokenizer(run, info, resume_tag=None)
    data = prepare_data(fit_vocab(run, tokenizer, info), tokenizer, info)
    log(info, data.description)
    rate = measure_batches(data.batches, count=batches)
    log(info, f"data loading: {rate.summary()}")
    return rate
