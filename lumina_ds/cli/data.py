"""Data verbs: `validate-data`, `prepare-data`, `tokenizer train`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from lumina_ds.config.run import DATA_FORMATS, MAX_LINE_BYTES
from lumina_ds.errors import ConfigError

if TYPE_CHECKING:
    from lumina_ds.data import LineLimit

SOURCES_HELP = (
    ".jsonl, .jsonl.gz, .json, .parquet files, datasets save_to_disk dirs (DIR[@SPLIT]), hf://NAME[:CONFIG][@SPLIT]"
)


def _add_line_limit_flags(p: argparse.ArgumentParser) -> None:
    """--max-line-bytes, --truncate-long, --data-format and --data-fields, spelled and defaulted as for `train`."""
    p.add_argument(
        "--max-line-bytes",
        type=int,
        default=MAX_LINE_BYTES,
        help=f"a line longer than this is an error (E111), not read into memory (default: {MAX_LINE_BYTES})",
    )
    p.add_argument(
        "--truncate-long",
        action="store_true",
        help="cut longer lines' message contents to fit instead, with a warning (W106) (default: off)",
    )
    p.add_argument(
        "--data-format",
        choices=DATA_FORMATS,
        default="auto",
        help="record format of every source (default: auto, detected per source)",
    )
    p.add_argument(
        "--data-fields",
        metavar="OURS=THEIRS,...",
        help="the data's names for renamed fields, e.g. instruction=question,output=answer (default: none)",
    )


def _limit(args: argparse.Namespace) -> LineLimit:
    """How the sources are read: line limit and record format, from the flags above."""
    from lumina_ds.data import LineLimit, RecordFormat, parse_fields

    fmt = RecordFormat(args.data_format, parse_fields(args.data_fields))
    return LineLimit(args.max_line_bytes, args.truncate_long, fmt)


def _check_flags(args: argparse.Namespace) -> None:
    """Reject flag combinations that would otherwise be ignored."""
    if not args.fix_errors and (args.output or args.rejects):
        raise ConfigError("E002", "--output and --rejects need --fix-errors", "Add --fix-errors.")
    if args.fix_errors and not args.output:
        raise ConfigError("E002", "--fix-errors needs --output FILE", "Example: --fix-errors --output fixed.jsonl")
    if args.fix_errors and args.strict:
        raise ConfigError("E002", "--strict stops at the first error; --fix-errors must read every line", "Pick one.")
    if args.quiet and args.show_stats:
        raise ConfigError("E002", "--quiet prints one line; it cannot show statistics", "Drop --quiet or --show-stats.")


def cmd_validate_data(args: argparse.Namespace) -> int:
    # Imported here so that `lumina-ds --help` and other subcommands stay light.
    from lumina_ds.data import quiet_line, summary_lines, validate_files

    _check_flags(args)
    tokenizer = None
    if args.tokenizer:
        from lumina_ds.tokenizer import ChatTokenizer

        tokenizer = ChatTokenizer.from_file(args.tokenizer)
    rejects = args.rejects
    if args.fix_errors and not rejects:
        output = Path(args.output)
        rejects = str(output.with_name(f"{output.stem}_rejects.jsonl"))
    validator = validate_files(
        args.files,
        tokenizer=tokenizer,
        seq_len=args.seq_len,
        strict=args.strict,
        fix_output=args.output if args.fix_errors else None,
        rejects_output=rejects if args.fix_errors else None,
        limit=_limit(args),
    )
    print(quiet_line(validator) if args.quiet else "\n".join(summary_lines(validator, show_stats=args.show_stats)))
    if args.report is not None:
        report_path = Path(args.report or f"{report_stem(args.files[0])}_report.json")
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(validator.report(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        if not args.quiet:
            print(f"report: {report_path}")
    if args.fix_errors and not args.quiet:
        print(f"fixed data: {args.output}  rejected lines: {rejects}")
    return 0 if validator.ok else 1


def _validate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate-data",
        help="check chat data record by record (exit 1 if any record has an error)",
        description="Stream data sources once; report every problem with its line or row number, code and kind.",
    )
    p.add_argument("files", nargs="+", help=SOURCES_HELP)
    p.add_argument(
        "--report",
        "--create-report",
        dest="report",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="write the JSON report (default path: <first input stem>_report.json); put it after the files",
    )
    p.add_argument("--show-stats", action="store_true", help="print role counts and length histograms (default: off)")
    p.add_argument("--quiet", action="store_true", help="print one summary line only (default: off)")
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first error line (exit 1, print code and line) (default: off)",
    )
    p.add_argument(
        "--fix-errors", action="store_true", help="write repairable conversations normalized to --output (default: off)"
    )
    p.add_argument("--output", help="fixed JSONL file (with --fix-errors; default: none)")
    p.add_argument("--rejects", help="unrepairable lines as JSONL (default: <output stem>_rejects.jsonl)")
    p.add_argument("--tokenizer", help="tokenizer.json: adds token statistics (default: none)")
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="warn about conversations longer than this many tokens (default: no limit)",
    )
    _add_line_limit_flags(p)
    p.set_defaults(func=cmd_validate_data)


def report_stem(location: str) -> str:
    """The default report's name: the first source's stem (a hub name's too)."""
    from lumina_ds.data import parse_source

    return parse_source(location).stem


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from lumina_ds.data import EncodeSettings, parse_train_data, prepare_source
    from lumina_ds.tokenizer import ChatTokenizer

    if not args.tokenizer:
        raise ConfigError(
            "E002",
            "prepare-data needs the tokenizer the training run will use",
            "train one first: lumina-ds tokenizer train FILES --vocab-size N --output tok.json",
        )
    encode = EncodeSettings.of(
        ChatTokenizer.from_file(args.tokenizer),
        train_on=args.train_on,
        strict=args.strict,
        max_line_bytes=args.max_line_bytes,
        truncate_long=args.truncate_long,
        record_format=_limit(args).record_format,
    )
    specs = parse_train_data(",".join(args.files))  # a --train-data list, weights and all, prepares its sources
    total_tokens = 0
    for spec in specs:
        docs, report = prepare_source(
            spec.source,
            encode,
            prepared_dir=Path(args.output),
            num_workers=args.num_workers,
            shard_bytes=args.shard_size_mb << 20,
            progress=True,
        )
        total_tokens += report.tokens
        print(report.summary())
        for skipped in report.skipped_examples[:5]:
            print(f"  {spec.source.unit} {skipped.line_no}: {skipped.code} {skipped.reason}")
        print(f"  -> {len(docs.parts)} shard(s) in {report.directory}")
    print(f"{len(specs)} source(s), {total_tokens:,} tokens in {args.output}")
    # the line limit and record format are part of the shards' key: training must repeat non-default ones to reuse them
    limit = f" --max-line-bytes {args.max_line_bytes}" if args.max_line_bytes != MAX_LINE_BYTES else ""
    limit += " --truncate-long" if args.truncate_long else ""
    limit += f" --data-format {args.data_format}" if args.data_format != "auto" else ""
    limit += f" --data-fields {args.data_fields}" if args.data_fields else ""
    print(f"train with: --prepared-dir {args.output} --tokenizer {args.tokenizer} --data-strategy sharded{limit}")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from lumina_ds.data import parse_train_data, sample_texts
    from lumina_ds.tokenizer import train_bpe_tokenizer

    locations = [spec.source.location for spec in parse_train_data(",".join(args.files))]
    texts = sample_texts(locations, max_bytes=args.max_mb * 10**6)
    tokenizer = train_bpe_tokenizer(texts, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    tokenizer.save(args.output)
    print(f"byte-level BPE with {tokenizer.vocab_size:,} tokens (chat special tokens = ids 0-5) -> {args.output}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    _validate_parser(sub)
    p = sub.add_parser("prepare-data", help="tokenize data sources into memory-mapped token shards (cached by hash)")
    p.add_argument("files", nargs="+", help=SOURCES_HELP)
    p.add_argument("--tokenizer", help="tokenizer.json the training run will use (required)")
    p.add_argument("--output", default="data/prepared", help="prepared-shard cache directory (default: data/prepared)")
    p.add_argument("--num-workers", type=int, default=2, help="tokenizing processes (default: 2)")
    p.add_argument("--shard-size-mb", type=int, default=256, help="data megabytes per shard (default: 256)")
    p.add_argument("--train-on", choices=("assistant", "all"), default="assistant",
                   help="which tokens carry loss (default: assistant)")  # fmt: skip
    p.add_argument("--strict", action="store_true", help="stop at the first malformed line (default: off)")
    _add_line_limit_flags(p)
    p.set_defaults(func=cmd_prepare_data)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokenizer_command", required=True)
    p = tok.add_parser("train", help="train a byte-level BPE tokenizer with the chat special tokens")
    p.add_argument("files", nargs="+", help=SOURCES_HELP)
    p.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary (required)")
    p.add_argument("--output", required=True, help="where to write tokenizer.json (required)")
    p.add_argument("--max-mb", type=int, default=200, help="megabytes of message text to learn from (default: 200)")
    p.add_argument("--min-frequency", type=int, default=2, help="rarest pair merged (default: 2)")
    p.set_defaults(func=cmd_tokenizer_train)
