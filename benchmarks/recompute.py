"""Activation checkpointing modes and --compile side by side: step time and memory of one model on this machine.

Time (the default): one process, one eager and one compiled copy of the model, the modes taking turns step by step
(forward + backward), so that a machine shared with other jobs slows every mode alike; the median of --steps after
one warm-up round (two with --compile). Memory (--memory): each mode in its own process, peak RSS above the RSS of
the built model over warm-up + --steps training steps (activations, recompute, gradients and AdamW's states; the
last two are the same in every row), beside the memory model's activations (stored + recompute peak + logits).

    python benchmarks/recompute.py --preset m70_memory --seq-len 256 --batch-size 2 --steps 3 --compile
    python benchmarks/recompute.py --preset m70_memory --seq-len 256 --batch-size 2 --steps 3 --memory
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from lumina_ds.models.transformer import Transformer

MIB = 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def one_row(args: argparse.Namespace, mode: str, compiled: bool) -> dict[str, float]:
    """Build the model, then time `args.steps` steps; peak RSS is read after the last."""
    import torch

    from lumina_ds.config.presets import get_preset
    from lumina_ds.planning.activations import activation_bytes
    from lumina_ds.planning.memory_inputs import Layout

    torch.manual_seed(0)
    config = get_preset(args.preset).model
    model = Transformer(config).train()
    model.set_recompute(mode)
    if compiled:
        model.compile_blocks()
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = rss_bytes()
    times = []
    for _ in range(args.steps + (2 if compiled else 1)):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(ids, labels=ids)["loss"].backward()
        opt.step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    layout = Layout(zero_stage=0, gpus=1, micro_batch_size=args.batch_size, seq_len=args.seq_len, precision="fp32",
                    recompute=mode)  # fmt: skip
    predicted = activation_bytes(config, layout)
    model = predicted["activations"] + predicted["recompute"] + predicted["logits"]
    return {"seconds": statistics.median(times[-args.steps :]), "peak": peak - before, "model": model,
            "threads": torch.get_num_threads()}  # fmt: skip


def interleaved_seconds(args: argparse.Namespace) -> dict[tuple[str, bool], float]:
    """Median seconds per forward + backward of every (mode, compiled), the variants taking turns each round."""
    import copy

    import torch

    from lumina_ds.config.presets import get_preset

    torch.manual_seed(0)
    config = get_preset(args.preset).model
    eager = Transformer(config).train()
    models = {False: eager}
    if args.compile:
        models[True] = copy.deepcopy(eager)
        models[True].compile_blocks()
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))
    times: dict[tuple[str, bool], list[float]] = {(m, c): [] for c in models for m in args.modes}
    for _ in range(args.steps + (2 if args.compile else 1)):
        for mode, compiled in times:
            model = models[compiled]
            model.set_recompute(mode)
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            model(ids, labels=ids)["loss"].backward()
            times[(mode, compiled)].append(time.perf_counter() - start)
    return {key: statistics.median(t[-args.steps :]) for key, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="m70_memory")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=["none", "attention", "moe", "full"])
    p.add_argument("--compile", action="store_true", help="time each mode with the blocks compiled too")
    p.add_argument("--memory", action="store_true", help="peak RSS per mode, each in its own process")
    p.add_argument("--row", nargs=2, metavar=("MODE", "COMPILED"), help=argparse.SUPPRESS)  # a child process
    args = p.parse_args()
    if args.row:
        print(json.dumps(one_row(args, args.row[0], args.row[1] == "1")))
        return
    if not args.memory:
        seconds = interleaved_seconds(args)
        full = seconds.get(("full", False))
        print(f"{args.preset} fp32, batch {args.batch_size} x seq {args.seq_len}: seconds per forward + backward")
        for (mode, compiled), value in seconds.items():
            ratio = f"{value / full:.2f}x full" if full else ""
            print(f"{mode + (' +compile' if compiled else ''):<18}{value:>8.2f}  {ratio}")
        return
    rows = {}
    for mode in args.modes:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--row", mode, "0"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows[mode] = json.loads(out.strip().splitlines()[-1])
    print(f"{args.preset} fp32, batch {args.batch_size} x seq {args.seq_len}, {rows[args.modes[0]]['threads']} threads")
    print(f"{'mode':<12}{'s/step':>8}{'peak MiB':>10}{'vs full':>9}{'model MiB':>11}")
    full_row = rows.get("full")
    for mode, row in rows.items():
        ratio = f"{row['peak'] / full_row['peak']:.2f}x" if full_row else "-"
        print(f"{mode:<12}{row['seconds']:>8.2f}{row['peak'] / MIB:>10.0f}{ratio:>9}{row['model'] / MIB:>11.0f}")


if __name__ == "__main__":
    main()
