"""`plan`, `analyze-memory`, `dry-run`, `estimate-time`, `ds-config` subcommands."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the `lumina-ds` parser."""
