"""`lumina-ds` command line: one module per group of verbs, each with `register(sub)`; thin parsers that resolve a
config and call one function each. Modules import the heavy parts (torch, DeepSpeed) inside their commands, so a
light command (validate-data, plan, ...) never loads torch."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lumina_ds import __version__
from lumina_ds.cli import chat, data, env, generate, hf, plan, report, train
from lumina_ds.cli.luminaai import alias_notes, luminaai_mappings
from lumina_ds.errors import ConfigError, LuminaError

COMMAND_GROUPS = (train, chat, generate, data, plan, env, hf, report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lumina-ds", description="Train Mixture-of-Experts chat models with DeepSpeed."
    )
    parser.add_argument("--version", action="version", version=f"lumina-ds {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse argv; a LuminaAI spelling gets its lumina-ds equivalent (E002) instead of argparse's bare error."""
    parser = build_parser()
    mappings = luminaai_mappings(parser, argv)
    if mappings:
        raise ConfigError("E002", "LuminaAI flag(s) lumina-ds spells differently:\n  " + "\n  ".join(mappings),
                          "see `lumina-ds <command> --help` and the README's 'Coming from LuminaAI'")  # fmt: skip
    for note in alias_notes(argv):
        print(note, file=sys.stderr, flush=True)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse(argv)
        return int(args.func(args))
    except LuminaError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1


def entry(argv: Sequence[str] | None = None) -> None:
    """Console-script entry: like main(), but leaves through os._exit after a distributed run.

    torch's gloo teardown can abort after a clean finish (docs/deepspeed.md), turning success into SIGABRT.
    """
    code = main(argv)
    if "torch" not in sys.modules:  # a light command (validate-data, plan, ...): nothing distributed ran
        sys.exit(code)
    from lumina_ds.distributed.env import exit_process

    exit_process(code)
