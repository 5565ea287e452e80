"""`check-environment`: what this machine has, and whether it can run a preset."""

from __future__ import annotations

import argparse
import json
import sys

from lumina_ds.config.presets import PRESETS
from lumina_ds.config.run import PRECISIONS


def cmd_check_environment(args: argparse.Namespace) -> int:
    from lumina_ds.planning.environment import check_environment, format_report

    report, error = check_environment(output_dir=args.output_dir, preset=args.preset, precision=args.precision)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-environment",
        help="torch/CUDA/NCCL, GPUs, DeepSpeed ops, flash-attn, MPI, memory, disk; can this machine run a preset?",
    )
    p.add_argument("--preset", "--config", dest="preset", metavar="PRESET", default=None,
                   help=f"also check that this machine can hold the model states of one of {', '.join(PRESETS)} "
                   "(E003 when not) (default: none)")  # fmt: skip
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="the precision to check (default: the preset's, else auto)")  # fmt: skip
    p.add_argument("--output-dir", default="runs",
                   help="where runs will be written: its free disk is reported (default: runs)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="one JSON object on stdout (default: off)")
    p.set_defaults(func=cmd_check_environment)
