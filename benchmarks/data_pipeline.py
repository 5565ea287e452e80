"""Data pipeline throughput: tokenization, prepared-shard reads and streaming, against the rate `debug` trains at.

On a generated corpus (the bundled conversations, made unique and repeated to --size-mb) or on --train-data:
tokenization in 1 and N processes, writing prepared shards, streaming's one-time token count, reading batches in each
strategy (memory, sharded, streaming with 0 and N workers), and the tokens/s of `debug` training steps (forward,
backward, AdamW) in this process for scale. A table goes to stdout, the same rows as JSON to --output. See
benchmarks/NOTES.md for results.

    python benchmarks/data_pipeline.py --size-mb 32 --workers 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # its sibling modules (tests/benchmarks would shadow the package)

from corpus import write_conversations  # noqa: E402

from lumina_ds.config.presets import get_preset  # noqa: E402
from lumina_ds.data import sample_texts  # noqa: E402
from lumina_ds.data.loading.mixture import Mixture  # noqa: E402
from lumina_ds.data.loading.profile import measure_batches  # noqa: E402
from lumina_ds.data.loading.stream import PackedBatches, RankView  # noqa: E402
from lumina_ds.data.prepare.documents import DocEncoder, JsonlDocs  # noqa: E402
from lumina_ds.data.prepare.lengths import count_tokens  # noqa: E402
from lumina_ds.data.prepare.tokenize import (  # noqa: E402
    EncodeSettings,
    prepare_source,
    tokenize_source,
)
from lumina_ds.models.transformer import Transformer  # noqa: E402
from lumina_ds.tokenizer import ChatTokenizer, train_bpe_tokenizer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-data", help="a JSONL chat file (default: generate one of --size-mb)")
    p.add_argument("--size-mb", type=float, default=32.0, help="size of the generated corpus")
    p.add_argument("--tokenizer", help="tokenizer.json (default: train a BPE of --vocab-size on a sample)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--workers", type=int, default=2, help="processes for the parallel rows")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=400, help="batches timed per read measurement")
    p.add_argument("--train-steps", type=int, default=10, help="debug training steps timed (0 skips)")
    p.add_argument("--output", help="write the results as JSON here")
    return p.parse_args(argv)


def generate_corpus(path: Path, size_mb: float) -> Path:
    """The bundled conversations with a counter in every user turn, repeated until `size_mb` (no duplicates)."""
    return write_conversations(path, size_mb)


def timed(label: str, fn: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    print(f"  {label}: {seconds:.1f}s", file=sys.stderr)
    return result, seconds


def tokenization_rows(path: Path, settings: EncodeSettings, workers: int, cache: Path) -> list[dict[str, Any]]:
    size = path.stat().st_size
    rows = []
    for n in sorted({1, workers}):
        (_docs, report), seconds = timed(f"tokenize x{n}", lambda n=n: tokenize_source(path, settings, num_workers=n))
        rows.append(_row(f"tokenize into RAM, {n} process(es)", report.tokens / seconds, size / seconds, report))
    (_, report), seconds = timed("prepare shards", lambda: prepare_source(path, settings, prepared_dir=cache,
                                                                          num_workers=workers))  # fmt: skip
    rows.append(_row(f"prepare-data (write shards), {workers} process(es)", report.tokens / seconds, size / seconds,
                     report))  # fmt: skip
    return rows


def _row(name: str, tokens_per_s: float, bytes_per_s: float | None = None, report: Any = None) -> dict[str, Any]:
    row: dict[str, Any] = {"measurement": name, "tokens_per_s": round(tokens_per_s)}
    if bytes_per_s is not None:
        row["mb_per_s"] = round(bytes_per_s / 1e6, 2)
    if report is not None:
        row["conversations_per_s"] = round(report.conversations * tokens_per_s / max(report.tokens, 1))
    return row


def read_rows(sources: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    cases = [("memory", 0), ("sharded", 0), ("streaming", 0), ("streaming", args.workers)]
    for strategy, workers in cases:
        source = sources[strategy]
        view = RankView([source], Mixture([len(source)], [1.0], seed=0))
        batches = PackedBatches(view, seq_len=args.seq_len, pad_id=0, micro_batch_size=args.batch_size,
                                num_workers=workers)  # fmt: skip
        count = args.batches if strategy != "streaming" else max(args.batches // 4, 10)
        rate = measure_batches(batches, count=count, warmup=2)
        name = f"read batches: {strategy}" + (f", {workers} worker(s)" if strategy == "streaming" else "")
        rows.append(_row(name, rate.tokens_per_s))
        print(f"  {name}: {rate.summary()}", file=sys.stderr)
    return rows


def debug_train_rate(args: argparse.Namespace) -> float:
    """tokens/s of plain-torch `debug` training steps at this batch shape (the model side of the comparison)."""
    torch.manual_seed(0)
    config = get_preset("debug").model
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    shape = (args.batch_size, args.seq_len)
    batches = [torch.randint(6, config.vocab_size, shape) for _ in range(args.train_steps + 2)]
    started = 0.0
    for step, ids in enumerate(batches):
        if step == 2:
            started = time.perf_counter()
        out = model(ids, labels=ids)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return args.train_steps * ids.numel() / (time.perf_counter() - started)


def print_table(rows: list[dict[str, Any]], train_rate: float | None) -> None:
    print(f"{'measurement':<52} {'tokens/s':>12} {'MB/s':>8} {'x debug':>8}")
    for row in rows:
        ratio = f"{row['tokens_per_s'] / train_rate:.0f}x" if train_rate else "-"
        print(f"{row['measurement']:<52} {row['tokens_per_s']:>12,} {row.get('mb_per_s', ''):>8} {ratio:>8}")
    if train_rate:
        print(f"{'debug preset training (forward+backward+AdamW)':<52} {train_rate:>12,.0f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = Path(args.train_data) if args.train_data else generate_corpus(work / "corpus.jsonl", args.size_mb)
        if args.tokenizer:
            tokenizer = ChatTokenizer.from_file(args.tokenizer)
        else:
            tokenizer = train_bpe_tokenizer(sample_texts([path], max_bytes=4 << 20), vocab_size=args.vocab_size)
        settings = EncodeSettings.of(tokenizer)
        rows = tokenization_rows(path, settings, args.workers, work / "prepared")
        sources = {
            "memory": tokenize_source(path, settings, num_workers=args.workers)[0],
            "sharded": prepare_source(path, settings, prepared_dir=work / "prepared")[0],
            "streaming": JsonlDocs(path, DocEncoder(tokenizer)),
        }
        # streaming counts every conversation's tokens once before training (global row order needs the lengths)
        report, seconds = timed("count tokens", lambda: count_tokens(sources["streaming"], num_workers=args.workers))
        size = path.stat().st_size
        rows.append(_row(f"streaming: count tokens once, {args.workers} worker(s)", report.tokens / seconds,
                         size / seconds, report))  # fmt: skip
        rows += read_rows(sources, args)
        size_mb = path.stat().st_size / 1e6
    train_rate = debug_train_rate(args) if args.train_steps else None
    print_table(rows, train_rate)
    result = {"corpus_mb": round(size_mb, 1), "rows": rows, "debug_train_tokens_per_s": train_rate,
              "threads": torch.get_num_threads(), "workers": args.workers}  # fmt: skip
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
