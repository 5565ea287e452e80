"""Weights & Biases: the scalars TensorBoard gets, with the resolved run config, from rank 0 (`--wandb`).

WANDB_MODE=offline writes the run under WANDB_DIR (default: the run directory) with no network; `wandb sync`
uploads it later.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from lumina_ds.errors import ConfigError
from lumina_ds.monitor.callbacks import Callback, eval_scalars, train_scalars


def import_wandb() -> ModuleType:
    """The wandb package, or E003 with the install hint (checked before any work when --wandb is on)."""
    try:
        return importlib.import_module("wandb")
    except ImportError as exc:
        raise ConfigError(
            "E003",
            f"--wandb needs the wandb package, which cannot be imported here ({exc})",
            "pip install lumina-ds[wandb] (or pip install wandb), or drop --wandb",
        ) from exc


class WandbLogger(Callback):
    """One W&B run per training session; the caller gives it to rank 0 only, as every callback."""

    def __init__(
        self,
        *,
        config: dict[str, Any],
        run_dir: Path,
        project: str,
        entity: str | None = None,
        name: str | None = None,
    ) -> None:
        self.wandb = import_wandb()
        self.settings = {"project": project, "entity": entity, "name": name or run_dir.name, "config": config,
                         "dir": None if os.environ.get("WANDB_DIR") else str(run_dir)}  # fmt: skip
        self.run: Any = None

    def on_train_start(self, info: dict[str, Any]) -> None:
        self.run = self.wandb.init(**self.settings)

    def on_log(self, metrics: dict[str, Any]) -> None:
        self.run.log(train_scalars(metrics), step=metrics["step"])

    def on_eval(self, metrics: dict[str, Any]) -> None:
        self.run.log(eval_scalars(metrics), step=metrics["step"])  # joins the log line's row of the same step

    def on_train_end(self, summary: dict[str, Any]) -> None:
        self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        self.run.finish()
