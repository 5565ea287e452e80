"""Memory model vs measurement: real 1- and 2-rank CPU DeepSpeed runs (debug and a ~57M MoE; ZeRO 1/2/3; with and
without activation recompute and expert parallelism; fp32 and mixed bf16, with and without gradient accumulation)
against `lumina_ds.planning.memory`'s prediction.

What is measured, per rank (the table shows the largest rank: DeepSpeed's last partition holds a padded gradient
copy the others do not):
- model states: bytes of every live tensor storage (deduplicated; parameters, ZeRO partitions `ds_tensor`,
  gradients, flat buffers, optimizer states, reduction buckets) at the moment the torch AdamW inside DeepSpeed starts
  its step (a step pre-hook; DeepSpeed steps one parameter group at a time: the largest reading of all steps).
  Compared with predicted parameters + gradients + optimizer states + reduction buckets.
- overall: peak RSS of the rank (ru_maxrss) over 3 steps minus its RSS after a warm-up (one step of a tiny model
  through the same DeepSpeed path: what a process pays once, whatever the model, is then in the base; reported as
  `process`). Compared with the predicted per-device total without the process term and without the GPU caching
  allocator's fragmentation margin. glibc's mmap threshold is fixed (MALLOC_MMAP_THRESHOLD_), so a freed block
  leaves RSS as a freed GPU block is reused, instead of staying in the heap.
- rank load: with expert parallelism, the busiest rank's routed tokens over the mean (models/moe.py); the
  prediction uses it in place of the planning allowance DROPLESS_IMBALANCE.
Packed rows of 64-token documents, as training feeds them.

    python benchmarks/memory_check.py              # the full table (22 runs, ~7 minutes on 2 cores)
    python benchmarks/memory_check.py --quick      # two cases: the 57M MoE on 2 ranks, ZeRO-1 and ZeRO-3
    python benchmarks/memory_check.py --case 11    # one case (an index into CASES)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.multiprocessing as mp

from lumina_ds.config.presets import get_preset
from lumina_ds.config.run import RunConfig
from lumina_ds.distributed.ds_config import fp32_grad_accumulation
from lumina_ds.models.config import ModelConfig, MoEConfig
from lumina_ds.models.moe import rank_load_imbalance
from lumina_ds.planning.layouts import planned_extras
from lumina_ds.planning.memory import estimate_memory
from lumina_ds.planning.memory_inputs import Layout, precision_bytes, with_bucket_rules

STEPS = 3
MMAP_THRESHOLD = 1 << 16  # bytes: larger allocations are mmapped and returned to the system when freed
DOC_LEN = 64


@dataclass(frozen=True)
class Case:
    model: str  # debug | m57
    ranks: int
    zero: int
    ckpt: bool
    ep: int = 1
    micro: int = 8
    seq: int = 256
    precision: str = "fp32"
    accum: int = 1  # micro-batches per optimizer step (mixed_bf16 then accumulates gradients in fp32)


def model_config(name: str) -> ModelConfig:
    if name == "debug":
        return get_preset("debug").model
    # ~57M parameters: 8 experts of ffn 1024 in 4 layers, tied 8192 x 512 embedding
    return ModelConfig(vocab_size=8192, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2,
                       intermediate_size=2048, max_seq_len=512,
                       moe=MoEConfig(num_experts=8, top_k=2, expert_intermediate_size=1024))  # fmt: skip


def run_config(case: Case) -> RunConfig:
    run = get_preset("debug")
    run.model = model_config(case.model)
    run.train.micro_batch_size, run.train.grad_accum = case.micro, case.accum
    run.train.activation_checkpointing, run.train.precision = ("full" if case.ckpt else "none"), case.precision
    run.distributed.zero_stage, run.distributed.expert_parallel_size = case.zero, case.ep
    run.distributed.deepspeed = planned_extras(layout_of(case))  # the bucket sizes a planned layout carries
    run.data.seq_len = case.seq
    run.validate()
    return run


def layout_of(case: Case) -> Layout:
    layout = Layout(zero_stage=case.zero, gpus=case.ranks, gpus_per_node=case.ranks, expert_parallel_size=case.ep,
                    micro_batch_size=case.micro, seq_len=case.seq, recompute="full" if case.ckpt else "none",
                    precision=case.precision, device="cpu",
                    grad_accum=case.accum,
                    grad_accum_fp32=fp32_grad_accumulation(case.precision, case.zero, case.accum))  # fmt: skip
    return with_bucket_rules(layout, model_config(case.model))


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensor_bytes(extra: list[torch.Tensor]) -> int:
    """Bytes of all distinct tensor storages reachable from Python (plus ZeRO-3 partitions and gradients)."""
    gc.collect()  # activations in not-yet-collected reference cycles are not model states
    seen: set[int] = set()
    total = 0
    candidates = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)] + extra
    for t in candidates:
        for x in (t, getattr(t, "ds_tensor", None), t.grad if t.is_leaf else None):
            if not isinstance(x, torch.Tensor) or x.device.type == "meta":
                continue
            storage = x.untyped_storage()
            if storage.data_ptr() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def trace(rank: int, where: str) -> None:
    """MEMORY_CHECK_TRACE=1: rank 0's current and peak RSS after each phase."""
    if rank == 0 and os.environ.get("MEMORY_CHECK_TRACE"):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"  {where:<22} rss {rss_bytes() / 2**20:8.1f} MB  peak {peak:8.1f} MB", flush=True)


def batch(case: Case, vocab: int, step: int, *, micro: int, seq: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, vocab, (micro, seq), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    pos = (torch.arange(seq) % DOC_LEN).expand(micro, seq)  # packed 64-token documents
    return ids, labels, pos


def train_steps(case: Case, run: RunConfig, info: object, steps: int, on_step: list[int] | None) -> float:
    """Build the model and engine of `run` and train `steps` steps; `on_step` gets the live tensor bytes each time the
    optimizer starts a step. Returns the largest rank load of the routing (models/moe.py rank_load_imbalance)."""
    from lumina_ds.training.engine import build_engine, build_model

    rank = getattr(info, "rank", 0)
    model = build_model(run, world_size=getattr(info, "world_size", 1), precision=case.precision)
    trace(rank, "model built")
    engine = build_engine(model, run, info=info, total_steps=steps, precision=case.precision).engine  # type: ignore[arg-type]
    trace(rank, "engine built")
    if on_step is not None:
        params = list(engine.module.parameters())
        engine.basic_optimizer.register_step_pre_hook(lambda *_: on_step.append(live_tensor_bytes(params)))
    load = 1.0
    for step in range(steps):
        ids, labels, pos = batch(case, run.model.vocab_size, step, micro=run.train.micro_batch_size, seq=run.seq_len)
        out = engine(ids, labels=labels, position_ids=pos)
        counts = out["metrics"]["expert_counts"].tolist()
        load = max(load, rank_load_imbalance(counts, case.ep))
        trace(rank, f"step {step} forward")
        engine.backward(out["loss"])
        trace(rank, f"step {step} backward")
        del out
        engine.step()
        trace(rank, f"step {step} optimizer")
    engine.destroy()
    return load


def warm_up(case: Case, info: object) -> None:
    """One step of a tiny model through the same DeepSpeed path (ZeRO stage, expert groups, precision): what a
    process pays once whatever the model (imports the engine triggers, thread pools, groups, first-call kernel
    caches) is then in the base RSS, and the measured rise is the model's."""
    run = run_config(case)
    run.model = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                            intermediate_size=64, max_seq_len=32,
                            moe=MoEConfig(num_experts=2 * case.ep, top_k=1, expert_intermediate_size=32))  # fmt: skip
    run.train.micro_batch_size, run.train.grad_accum, run.data.seq_len = 1, 1, 32
    run.validate()
    train_steps(case, run, info, 1, None)


def worker(rank: int, case: Case, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(case.ranks), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")  # fmt: skip
    torch.set_num_threads(1)
    from lumina_ds.distributed.env import exit_process, init_distributed

    info = init_distributed()
    start_rss = rss_bytes()
    warm_up(case, info)
    gc.collect()
    base_rss, base_live = rss_bytes(), live_tensor_bytes([])
    trace(rank, "base")
    torch.manual_seed(0)
    at_step: list[int] = []
    load = train_steps(case, run_config(case), info, STEPS, at_step)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"states": max(at_step) - base_live, "overall": peak - base_rss, "process": base_rss - start_rss,
              "rank_load": load}  # fmt: skip
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    exit_process(0)


def measure(case: Case) -> dict[str, float]:
    from lumina_ds.distributed.env import free_port

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(case, free_port(), tmp), nprocs=case.ranks, start_method="spawn")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(case.ranks)]
    return {key: max(r[key] for r in ranks) for key in ranks[0]}  # the worst rank is what must fit


def predict(case: Case, rank_load: float, *, backend: str = "sdpa") -> dict[str, float]:
    """The model's figures for `case`, its expert-parallel activations at the rank load the run measured, with the
    attention `backend` that runs (`auto` is SDPA on a CPU)."""
    layout = replace(layout_of(case), routed_load=rank_load)
    estimate = estimate_memory(replace(model_config(case.model), attention_backend=backend), layout)
    buckets = layout.reduce_bucket_size * (4 if case.zero == 1 else precision_bytes(case.precision, case.zero).grad)
    buckets *= 2 if layout.overlap else 1
    # the process cost (warm_up) is measured apart, and fragmentation is the GPU caching allocator's: "overall" is
    # what the model's tensors add
    tensors = estimate.gpu_total - estimate.gpu["runtime"] - estimate.gpu["fragmentation"]
    return {"states": estimate.model_states + buckets, "overall": tensors}


CASES = [
    *(Case("debug", r, z, False) for r in (1, 2) for z in (1, 2, 3)),
    Case("debug", 2, 3, True),
    *(Case("m57", 2, z, c) for z in (1, 2, 3) for c in (False, True)),
    Case("m57", 1, 1, False),
    Case("m57", 2, 3, False, ep=2),
    Case("m57", 2, 2, False, ep=2),
    *(Case("m57", 2, z, False, precision="mixed_bf16") for z in (1, 2, 3)),
    *(Case("m57", 2, z, False, precision="mixed_bf16", accum=2) for z in (1, 2, 3)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two cases: the 57M MoE on 2 ranks, ZeRO-1 and ZeRO-3")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--case", type=int, action="append", help="run only CASES[i] (repeatable)")
    args = parser.parse_args()
    # glibc's dynamic mmap threshold rises to the size of each large block freed, after which such blocks come from
    # the heap and stay in RSS once freed (activations then look alive at the optimizer step); a fixed threshold
    # returns every large block at free, as the GPU's caching allocator hands freed blocks to the next allocation
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    cases = [CASES[7], CASES[11]] if args.quick else CASES  # the 57M MoE on 2 ranks at ZeRO-1 and ZeRO-3
    if args.case:
        cases = [CASES[i] for i in args.case]
    rows = []
    print("| model | precision | accum | ranks | ZeRO | EP | recompute | rank load | process MB | states pred MB | "
          "states meas MB | err | overall pred MB | overall meas MB | err |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        meas = measure(case)
        pred = predict(case, meas["rank_load"])
        err = {k: (pred[k] - meas[k]) / meas[k] for k in pred}
        rows.append({**asdict(case), "predicted": pred, "measured": meas})
        ckpt = "on" if case.ckpt else "off"
        print(f"| {case.model} | {case.precision} | {case.accum} | {case.ranks} | {case.zero} | {case.ep} | {ckpt} | "
              f"{meas['rank_load']:.2f} | {meas['process'] / 2**20:.0f} | "
              f"{pred['states'] / 2**20:.1f} | {meas['states'] / 2**20:.1f} | {100 * err['states']:+.1f}% | "
              f"{pred['overall'] / 2**20:.1f} | {meas['overall'] / 2**20:.1f} | {100 * err['overall']:+.1f}% |",
              flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
