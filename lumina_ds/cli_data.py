"""`prepare-data` and `tokenizer train` subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from lumina_ds.errors import ConfigError


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from lumina_ds.data.documents import parse_train_data
    from lumina_ds.data.prepare import EncodeSettings, prepare_source
    from lumina_ds.data.tokenizer import ChatTokenizer

    if not args.tokenizer:
        raise ConfigError(
            "E002",
            "prepare-data needs the tokenizer the training run will use",
            "train one first: lumina-ds tokenizer train FILES --vocab-size N --output tok.json",
        )
    encode = EncodeSettings.of(ChatTokenizer.from_file(args.tokenizer), train_on=args.train_on, strict=args.strict)
    specs = parse_train_data(",".join(args.files))
    total_tokens = 0
    for spec in specs:
        docs, report = prepare_source(
            spec.path,
            encode,
            prepared_dir=Path(args.output),
            num_workers=args.num_workers,
            shard_bytes=args.shard_size_mb << 20,
            progress=True,
        )
        total_tokens += report.tokens
        print(report.summary())
        for skipped in report.skipped_examples[:5]:
            print(f"  line {skipped.line_no}: {skipped.code} {skipped.reason}")
        print(f"  -> {len(docs.parts)} shard(s) in {report.directory}")
    print(f"{len(specs)} file(s), {total_tokens:,} tokens in {args.output}")
    print(f"train with: --prepared-dir {args.output} --tokenizer {args.tokenizer} --data-strategy sharded")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from lumina_ds.data.documents import parse_train_data
    from lumina_ds.data.tokenizer import sample_texts, train_bpe_tokenizer

    paths = [spec.path for spec in parse_train_data(",".join(args.files))]
    texts = sample_texts(paths, max_bytes=args.max_mb * 10**6)
    tokenizer = train_bpe_tokenizer(texts, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    tokenizer.save(args.output)
    print(f"byte-level BPE with {tokenizer.vocab_size:,} tokens (chat special tokens = ids 0-5) -> {args.output}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the `lumina-ds` parser."""
    p = sub.add_parser("prepare-data", help="tokenize JSONL files into memory-mapped token shards (cached by hash)")
    p.add_argument("files", nargs="+", help="JSONL chat files")
    p.add_argument("--tokenizer", help="tokenizer.json the training run will use")
    p.add_argument("--output", default="data/prepared", help="prepared-shard cache directory (default data/prepared)")
    p.add_argument("--num-workers", type=int, default=2, help="tokenizing processes (default 2)")
    p.add_argument("--shard-size-mb", type=int, default=256, help="JSONL megabytes per shard (default 256)")
    p.add_argument("--train-on", choices=("assistant", "all"), default="assistant")
    p.add_argument("--strict", action="store_true", help="stop at the first malformed line")
    p.set_defaults(func=cmd_prepare_data)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokenizer_command", required=True)
    p = tok.add_parser("train", help="train a byte-level BPE tokenizer with the chat special tokens")
    p.add_argument("files", nargs="+", help="JSONL chat files")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output", required=True, help="where to write tokenizer.json")
    p.add_argument("--max-mb", type=int, default=200, help="megabytes of message text to learn from (default 200)")
    p.add_argument("--min-frequency", type=int, default=2)
    p.set_defaults(func=cmd_tokenizer_train)
