"""`validate-data` subcommands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lumina_ds.errors import ConfigError


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
    from lumina_ds.data.validate import quiet_line, summary_lines, validate_files

    _check_flags(args)
    tokenizer = None
    if args.tokenizer:
        from lumina_ds.data.tokenizer import ChatTokenizer

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
    )
    print(quiet_line(validator) if args.quiet else "\n".join(summary_lines(validator, show_stats=args.show_stats)))
    if args.report is not None:
        report_path = Path(args.report or f"{Path(args.files[0]).stem}_report.json")
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(validator.report(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        if not args.quiet:
            print(f"report: {report_path}")
    if args.fix_errors and not args.quiet:
        print(f"fixed data: {args.output}  rejected lines: {rejects}")
    return 0 if validator.ok else 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the `lumina-ds` parser."""
    p = sub.add_parser(
        "validate-data",
        help="check JSONL chat files line by line (exit 1 if any line has an error)",
        description="Stream JSONL chat files once; report every problem with its line number, code and kind.",
    )
    p.add_argument("files", nargs="+", help="JSONL files (one conversation per line)")
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
    p.add_argument("--show-stats", action="store_true", help="print role counts and length histograms")
    p.add_argument("--quiet", action="store_true", help="print one summary line only")
    p.add_argument("--strict", action="store_true", help="stop at the first error line (exit 1, print code and line)")
    p.add_argument("--fix-errors", action="store_true", help="write repairable conversations normalized to --output")
    p.add_argument("--output", help="fixed JSONL file (with --fix-errors)")
    p.add_argument("--rejects", help="unrepairable lines as JSONL (default: <output stem>_rejects.jsonl)")
    p.add_argument("--tokenizer", help="tokenizer.json: adds token statistics")
    p.add_argument("--seq-len", type=int, default=None, help="warn about conversations longer than this (tokens)")
    p.set_defaults(func=cmd_validate_data)
