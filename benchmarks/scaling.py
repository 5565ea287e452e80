"""Several ranks against one process on the same CPU: the same training run, two ways.

One process with N intra-op threads, then N ranks with one thread each (the DeepSpeed launcher, gloo), training the
same preset on the same data with the same global batch (N x the per-rank micro-batch), ZeRO stage and precision;
expert parallelism applies to the N-rank run only (one process holds every expert). Each run is `lumina-ds train`
as a user starts it; tokens/s is the median of its logged records after the first (warm-up), from metrics.jsonl.
Runs alternate (one, N, one, N, ...) so that a burst of load on a shared machine slows both alike.

    python benchmarks/scaling.py --preset debug --zero-stage 2 --expert-parallel-size 2 --steps 60 --repeats 2

The last line: `ratio 2 ranks / one process tokens/s: X.XXx`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from lumina_ds.distributed.env import free_port

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="debug")
    p.add_argument("--ranks", type=int, default=2, help="ranks of the multi-process run = threads of the single one")
    p.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--expert-parallel-size", type=int, default=2, help="for the multi-rank run")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4, help="rows per rank; one process takes ranks x this")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1, help="pairs of runs (one process, then the ranks)")
    p.add_argument("--train-data", default=str(ROOT / "examples" / "conversations.jsonl"))
    p.add_argument("--deepspeed-config", help="extra DeepSpeed keys for both runs (e.g. bucket sizes)")
    p.add_argument("--output", help="append the result as a JSON line to this file")
    return p.parse_args(argv)


def train_flags(args: argparse.Namespace, *, name: str, out: Path, micro_batch: int, ep: int) -> list[str]:
    flags = ["--preset", args.preset, "--train-data", args.train_data, "--seq-len", str(args.seq_len),
             "--max-steps", str(args.steps), "--log-every-n-steps", str(args.log_every),
             "--zero-stage", str(args.zero_stage), "--expert-parallel-size", str(ep), "--precision", args.precision,
             "--micro-batch-size", str(micro_batch), "--grad-accum", "1", "--experiment-name", name,
             "--output-dir", str(out)]  # fmt: skip
    return flags + (["--deepspeed-config", args.deepspeed_config] if args.deepspeed_config else [])


def run_once(args: argparse.Namespace, out: Path, *, ranks: int, tag: str) -> float:
    """Train one run; its median logged tokens/s (all ranks together) after the first record."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(args.ranks // ranks))
    micro_batch = args.micro_batch_size * args.ranks // ranks
    flags = train_flags(
        args, name=tag, out=out, micro_batch=micro_batch, ep=args.expert_parallel_size if ranks > 1 else 1
    )
    if ranks == 1:
        cmd = [sys.executable, "-m", "lumina_ds", "train", *flags]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(free_port()), str(ROOT / "launch" / "train.py"), *flags]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{tag} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return median_tokens_per_s(out / tag / "metrics.jsonl")


def median_tokens_per_s(metrics: Path) -> float:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "loss" in r and r.get("tokens_per_s")]
    if len(speeds) < 2:
        raise SystemExit(f"{metrics}: fewer than 2 logged records; raise --steps or lower --log-every")
    return statistics.median(speeds[1:])


def measure(args: argparse.Namespace) -> dict[str, Any]:
    one: list[float] = []
    many: list[float] = []
    with tempfile.TemporaryDirectory(prefix="lumina_scaling_") as tmp:
        for repeat in range(args.repeats):
            one.append(run_once(args, Path(tmp), ranks=1, tag=f"one_{repeat}"))
            many.append(run_once(args, Path(tmp), ranks=args.ranks, tag=f"ranks_{repeat}"))
    return {"preset": args.preset, "ranks": args.ranks, "zero_stage": args.zero_stage,
            "expert_parallel_size": args.expert_parallel_size, "precision": args.precision, "seq_len": args.seq_len,
            "global_batch": args.micro_batch_size * args.ranks, "steps": args.steps,
            "one_process_tokens_per_s": one, "ranks_tokens_per_s": many,
            "ratio": statistics.median(many) / statistics.median(one)}  # fmt: skip


def report(result: dict[str, Any], output: str | None) -> None:
    n = result["ranks"]
    runs = ", ".join(f"{x:,.0f}" for x in result["one_process_tokens_per_s"])
    print(f"one process ({n} threads): {statistics.median(result['one_process_tokens_per_s']):,.0f} tokens/s [{runs}]")
    runs = ", ".join(f"{x:,.0f}" for x in result["ranks_tokens_per_s"])
    print(f"{n} ranks (1 thread each, EP {result['expert_parallel_size']}, ZeRO {result['zero_stage']}): "
          f"{statistics.median(result['ranks_tokens_per_s']):,.0f} tokens/s [{runs}]")  # fmt: skip
    print(f"ratio {n} ranks / one process tokens/s: {result['ratio']:.2f}x")
    if output:
        with open(output, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    report(measure(args), args.output)


if __name__ == "__main__":
    main()
