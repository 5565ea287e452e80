"""Data preparation at W = 1, 4, 16 ranks: the data path alone (`build_train_data`, no model), CPU processes in one
gloo group on this machine, on a generated corpus (the bundled conversations, made unique and repeated to --size-mb,
in three files of 60, 30 and 10% so that shares cross file boundaries; no downloads).

Every rank counts the input bytes it reads (hashing, line offsets, tokenizing; not the cache files:
lumina_ds/data/prepare/meter.py), all the bytes it reads through read() calls (/proc/self/io rchar: inputs, caches,
shards read into RAM; memory-mapped pages are not counted) and the tokens it encodes (a wrapper around
DocEncoder.encode_lines). The table shows, per strategy and W, the largest rank's counts against the fair share
total/W, the CPU seconds of the busiest rank (all its threads) and of all ranks, and the wall time of the slowest
rank; then the same run again on the warm cache. --code runs the ranks on
another checkout (an older commit, for a before/after comparison: it has no meter, the other columns work). A table
goes to stdout, the rows as JSON to --output. See benchmarks/NOTES.md for results.

    python benchmarks/data_scaling.py --size-mb 64 --ranks 1 4 16
    python benchmarks/data_scaling.py --size-mb 16 --code /tmp/old-checkout   # git worktree add /tmp/old-checkout REV
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CODE = Path(os.environ.get("DATA_SCALING_CODE", ROOT))  # the checkout the ranks run (set by --code for them)
sys.path.insert(0, str(CODE))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling modules, from this checkout

from corpus import write_conversations  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=float, default=24.0, help="size of the generated corpus")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--strategies", nargs="+", default=["streaming", "sharded", "memory"])
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--code", help="run the ranks on this checkout (default: this one)")
    p.add_argument("--output", help="write the rows as JSON here")
    return p.parse_args(argv)


def generate_corpus(directory: Path, size_mb: float) -> list[Path]:
    """The bundled conversations with a counter in every user turn, until `size_mb`, in files of 60/30/10%."""
    return [write_conversations(directory / f"chats{index}.jsonl", size_mb * share, label=f"{index}.")
            for index, share in enumerate((0.6, 0.3, 0.1))]  # fmt: skip


def rchar() -> int:
    """Bytes this process has read through read() calls so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def count_encoded_tokens(counter: list[int]) -> None:
    """Add the tokens of every document DocEncoder encodes in this process to counter[0] (any checkout)."""
    from lumina_ds.data.prepare.documents import DocEncoder

    encode = DocEncoder.encode_lines

    def counted(self: Any, lines: Any) -> Any:
        out = encode(self, lines)
        counter[0] += sum(len(item[0]) for item in out if isinstance(item, tuple))
        return out

    DocEncoder.encode_lines = counted  # type: ignore[method-assign]


def data_world(rank: int, world: int) -> Any:
    """This rank's DataWorld, with the all-gather where the checkout has it."""
    import dataclasses

    import torch.distributed as dist

    from lumina_ds.data.train_data import DataWorld
    from lumina_ds.distributed.collectives import all_gather_object, min_over_ranks, shared_by_all_ranks

    kwargs = dict(rank=rank, world_size=world, local_rank=rank, local_world_size=world, barrier=dist.barrier,
                  least_free_ram=min_over_ranks, shared=lambda path: shared_by_all_ranks(path, rank=rank),
                  log=lambda _message: None, all_gather=all_gather_object)  # fmt: skip
    names = {field.name for field in dataclasses.fields(DataWorld)}
    return DataWorld(**{k: v for k, v in kwargs.items() if k in names})


def input_bytes() -> int | None:
    try:
        from lumina_ds.data.prepare import meter
    except ImportError:  # a checkout from before the meter
        return None
    return meter.take().bytes_read


def rank_main(rank: int, world: int, port: int, job: dict[str, Any]) -> None:
    """One rank: join the group, prepare the data twice (cold, then on the warm cache), write what it did."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    from lumina_ds.config.run import DataConfig
    from lumina_ds.data.train_data import Batching, build_train_data
    from lumina_ds.tokenizer import ChatTokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    world_of = data_world(rank, world)
    tokens = [0]
    count_encoded_tokens(tokens)
    tokenizer = ChatTokenizer.from_str(Path(job["tokenizer"]).read_text())
    data = DataConfig(train_data=job["train_data"], strategy=job["strategy"], num_workers=0)
    batching = Batching(seq_len=256, micro_batch_size=8, grad_accum=1, seed=0, epochs=1)
    results = []
    for _ in ("cold", "warm"):
        dist.barrier()
        input_bytes()
        tokens[0], read_before, started, cpu = 0, rchar(), time.perf_counter(), time.process_time()
        train = build_train_data(data, tokenizer, batching, prepared_dir=Path(job["prepared"]), world=world_of)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu  # cpu: all threads of this rank
        results.append({"bytes": input_bytes(), "rchar": rchar() - read_before, "tokens": tokens[0],
                        "seconds": seconds, "cpu": cpu, "steps": train.total_steps})  # fmt: skip
    Path(job["out"], f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(world: int, job: dict[str, Any]) -> list[dict[str, Any]]:
    """Both runs (cold, warm) at `world` ranks: the largest rank's counts against the total over ranks."""
    import torch.multiprocessing as mp

    Path(job["out"]).mkdir(parents=True)
    mp.start_processes(rank_main, args=(world, free_port(), job), nprocs=world, start_method="spawn")
    per_rank = [json.loads(Path(job["out"], f"rank{r}.json").read_text()) for r in range(world)]
    rows = []
    for run, label in enumerate(("cold", "warm")):
        ranks = [results[run] for results in per_rank]
        assert len({r["steps"] for r in ranks}) == 1, "every rank must find the same data"
        row = {"strategy": job["strategy"], "ranks": world, "run": label, "steps": ranks[0]["steps"],
               "metered": ranks[0]["bytes"] is not None}  # fmt: skip
        for key in ("bytes", "rchar", "tokens"):
            total = sum(r[key] or 0 for r in ranks)
            row |= {f"{key}_total": total, f"{key}_max": max(r[key] or 0 for r in ranks)}
            row[f"{key}_ratio"] = row[f"{key}_max"] / (total / world) if total else 0.0
        row["seconds"] = max(r["seconds"] for r in ranks)
        row["cpu_max"], row["cpu_total"] = max(r["cpu"] for r in ranks), sum(r["cpu"] for r in ranks)
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """Per rank: input bytes (meter), all bytes read (rchar), tokens; each as the largest rank, total/W and ratio."""
    head = f"{'strategy':<10} {'W':>3} {'run':<5}"
    for label in ("input MB", "rchar MB"):
        head += f" {'max ' + label:>12} {'total/W':>8} {'ratio':>5}"
    print(head + f" {'max tokens':>11} {'total/W':>11} {'ratio':>5} {'max cpu s':>9} {'total':>6} {'wall s':>7}")
    for r in rows:
        line = f"{r['strategy']:<10} {r['ranks']:>3} {r['run']:<5}"
        for key in ("bytes", "rchar"):
            fair = r[f"{key}_total"] / r["ranks"] / 1e6
            if key == "bytes" and not r["metered"]:  # a checkout without the meter
                line += f" {'-':>12} {'-':>8} {'-':>5}"
                continue
            line += f" {r[f'{key}_max'] / 1e6:>12.2f} {fair:>8.2f} {r[f'{key}_ratio']:>5.2f}"
        fair_t = r["tokens_total"] / r["ranks"]
        line += f" {r['tokens_max']:>11,} {fair_t:>11,.0f} {r['tokens_ratio']:>5.2f}"
        print(line + f" {r['cpu_max']:>9.1f} {r['cpu_total']:>6.1f} {r['seconds']:>7.1f}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from lumina_ds.data import sample_texts
    from lumina_ds.tokenizer import train_bpe_tokenizer

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.code:
        os.environ["DATA_SCALING_CODE"] = str(Path(args.code).resolve())  # the spawned ranks import from there
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = generate_corpus(root, args.size_mb)
        tokenizer = train_bpe_tokenizer(sample_texts(files[:1], max_bytes=4 << 20), vocab_size=args.vocab_size)
        (root / "tokenizer.json").write_text(tokenizer.to_str())
        rows = []
        for strategy in args.strategies:
            for world in args.ranks:
                job = {"tokenizer": str(root / "tokenizer.json"), "train_data": ",".join(str(f) for f in files),
                       "strategy": strategy, "prepared": str(root / f"prepared-{strategy}-{world}"),
                       "out": str(root / f"out-{strategy}-{world}")}  # fmt: skip
                rows += measure(world, job)
                print(f"  {strategy} W={world}: {rows[-2]['seconds']:.1f}s cold", file=sys.stderr, flush=True)
        total = sum(f.stat().st_size for f in files)
        code = os.environ.get("DATA_SCALING_CODE", ROOT)
        print(f"corpus: {len(files)} files, {total / 1e6:.1f} MB; ranks run {code}; ratio = largest rank / (total / W)")
        print_table(rows)
        if args.output:
            Path(args.output).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
