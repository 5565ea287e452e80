"""`lumina-ds report`: a run's metrics as one PNG, other runs overlaid with `--compare`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="draw a run's metrics as one PNG",
        description="Loss against tokens, learning rate, gradient norm, tokens/s and MFU, routing and z-loss, and "
        "the expert load per layer over time, from a run's metrics.jsonl (training writes RUN/report.png itself).",
    )
    p.add_argument("run", metavar="RUN", help="a run directory (<output-dir>/<experiment-name>) or its metrics.jsonl")
    p.add_argument("--output", "-o", default=None, help="PNG to write (default: RUN/report.png)")
    p.add_argument("--compare", nargs="+", default=[], metavar="RUN2",
                   help="runs to overlay on RUN's line panels, each in its own colour (default: none)")  # fmt: skip
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from lumina_ds.monitor.report import REPORT_FILE, load_run, metrics_path, write_report

    runs = [load_run(path) for path in [args.run, *args.compare]]
    output = Path(args.output) if args.output else metrics_path(args.run).with_name(REPORT_FILE)
    write_report(runs, output)
    for run in runs:
        torn = f", {run.unreadable_lines} unreadable line(s) skipped" if run.unreadable_lines else ""
        print(f"{run.label}: {len(run.train)} training and {len(run.evals)} evaluation records{torn}")
    print(f"wrote {output}")
    return 0
