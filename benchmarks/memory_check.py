"""Memory model vs measurement: real 1- and 2-rank CPU DeepSpeed runs (debug and a ~57M MoE; ZeRO 1/2/3; with and
without activation recompute) against `lumina_ds.planning.memory`'s prediction.

What is measured, per rank (the table shows the largest rank: DeepSpeed's last partition holds a padded gradient
copy the others do not):
- model states: bytes of every live tensor storage (deduplicated; parameters, ZeRO partitions `ds_tensor`,
  gradients, flat buffers, optimizer states, reduction buckets) at the moment the torch AdamW inside DeepSpeed starts
  its step (a step pre-hook; DeepSpeed steps one parameter group at a time: the largest reading of all steps).
  Compared with predicted parameters + gradients + optimizer states + reduction buckets (what exists at that
  moment; ZeRO-3's gathered working set is released by then).
- overall: peak RSS of the rank (ru_maxrss) minus its RSS just before the model is built. Compared with the
  predicted per-device total with the GPU runtime overhead (CUDA context, NCCL) set to 0.
Precision fp32 (what `auto` picks on a CPU) and mixed bf16 (the GPU path; DeepSpeed's bf16 runs on CPU too);
packed rows of 64-token documents, as training feeds them.

    python benchmarks/memory_check.py              # the full table (19 runs, ~11 minutes on 2 cores)
    python benchmarks/memory_check.py --quick      # two cases
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.multiprocessing as mp

from lumina_ds.config.presets import get_preset
from lumina_ds.config.run import RunConfig
from lumina_ds.models.config import ModelConfig, MoEConfig
from lumina_ds.planning.layouts import planned_extras
from lumina_ds.planning.memory import Layout, estimate_memory, precision_bytes, with_bucket_rules

STEPS = 3
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
                    precision=case.precision, gpu_runtime_overhead=0.0)  # fmt: skip
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


def batch(case: Case, vocab: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, vocab, (case.micro, case.seq), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    pos = (torch.arange(case.seq) % DOC_LEN).expand(case.micro, case.seq)  # packed 64-token documents
    return ids, labels, pos


def worker(rank: int, case: Case, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(case.ranks), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")  # fmt: skip
    torch.set_num_threads(1)
    from lumina_ds.distributed.env import init_distributed
    from lumina_ds.training.engine import build_engine, build_model

    info = init_distributed()
    run = run_config(case)
    gc.collect()
    base_rss, base_live = rss_bytes(), live_tensor_bytes([])
    torch.manual_seed(0)
    model = build_model(run, world_size=info.world_size, precision=case.precision)
    engine = build_engine(model, run, info=info, total_steps=STEPS, precision=case.precision).engine
    at_step: list[int] = []
    params = list(engine.module.parameters())
    engine.basic_optimizer.register_step_pre_hook(lambda *_: at_step.append(live_tensor_bytes(params)))
    for step in range(STEPS):
        ids, labels, pos = batch(case, run.model.vocab_size, step)
        out = engine(ids, labels=labels, position_ids=pos)
        trace(rank, f"step {step} forward")
        engine.backward(out["loss"])
        trace(rank, f"step {step} backward")
        del out
        engine.step()
        trace(rank, f"step {step} optimizer")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"states": max(at_step) - base_live, "overall": peak - base_rss}  # the largest of the groups
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    from lumina_ds.distributed.env import exit_process

    exit_process(0)


def measure(case: Case) -> dict[str, int]:
    from lumina_ds.distributed.env import free_port

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(case, free_port(), tmp), nprocs=case.ranks, start_method="spawn")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(case.ranks)]
    return {key: max(r[key] for r in ranks) for key in ranks[0]}  # the worst rank is what must fit


def predict(case: Case) -> dict[str, float]:
    layout = layout_of(case)
    estimate = estimate_memory(model_config(case.model), layout)
    buckets = layout.reduce_bucket_size * (4 if case.zero == 1 else precision_bytes(case.precision, case.zero).grad)
    buckets *= 2 if layout.overlap else 1
    return {"states": estimate.model_states + buckets, "overall": estimate.gpu_total}


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
    parser.add_argument("--quick", action="store_true", help="two cases only")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--case", type=int, action="append", help="run only CASES[i] (repeatable)")
    args = parser.parse_args()
    cases = [CASES[0], CASES[7]] if args.quick else CASES
    if args.case:
        cases = [CASES[i] for i in args.case]
    rows = []
    print("| model | precision | ranks | ZeRO | EP | recompute | states pred MB | states meas MB | err | "
          "overall pred MB | overall meas MB | err |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        pred, meas = predict(case), measure(case)
        err = {k: (pred[k] - meas[k]) / meas[k] for k in pred}
        rows.append({**asdict(case), "predicted": pred, "measured": meas})
        ckpt = "on" if case.ckpt else "off"
        print(f"| {case.model} | {case.precision} | {case.ranks} | {case.zero} | {case.ep} | {ckpt} | "
              f"{pred['states'] / 2**20:.1f} | {meas['states'] / 2**20:.1f} | {100 * err['states']:+.1f}% | "
              f"{pred['overall'] / 2**20:.1f} | {meas['overall'] / 2**20:.1f} | {100 * err['overall']:+.1f}% |",
              flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
