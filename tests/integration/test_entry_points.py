"""The four ways to start training are one program: same flags, same resolved configs, same losses.

`lumina-ds train`, `python launch/train.py`, torchrun and the DeepSpeed launcher once disagreed about `--preset`: only
launch/train.py adopted the preset's planned layout, so `lumina-ds train --preset debug` ran ZeRO-1 while
`torchrun launch/train.py --preset debug` ran ZeRO-2. Each entry point here trains the same 4 steps in one process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lumina_ds.distributed.env import free_port
from tests.runs import FAST, ROOT, TRAIN, Result, child_env, deepspeed_launch, here, read_metrics, run

TRAIN_PY = str(ROOT / "launch" / "train.py")
NAME = "same"  # one experiment name: the run directories differ only by --output-dir
FLAGS = [*FAST, "--train-data", TRAIN, "--max-steps", "4", "--precision", "fp32", "--seed", "7"]
FLAGS += ["--no-tensorboard", "--no-progress-bar", "--experiment-name", NAME]
RUN_FILES = ("config.yaml", "ds_config.json")  # the resolved RunConfig and the JSON DeepSpeed was initialised with


def start(entry: str, workdir: Path, tokenizer: Path) -> subprocess.CompletedProcess[str] | Result:
    """Train with FLAGS through one entry point, into runs_<entry>/. The console script's code runs in this process
    (its `python -m lumina_ds` start is test_cli's); the three launches each start their own interpreter."""
    args = [*FLAGS, "--output-dir", f"runs_{entry}", "--tokenizer", str(tokenizer)]
    if entry == "cli":  # with the launched entry points' thread count: another count sums in another order
        threads = torch.get_num_threads()
        torch.set_num_threads(int(child_env()["OMP_NUM_THREADS"]))
        try:
            return here(["train", *args], cwd=workdir)
        finally:
            torch.set_num_threads(threads)
    if entry == "plain":
        return run([sys.executable, TRAIN_PY, *args], cwd=workdir)
    if entry == "torchrun":
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"]
        return run([*torchrun, "--master_port", str(free_port()), TRAIN_PY, *args], cwd=workdir)
    assert entry == "deepspeed"
    return deepspeed_launch(args, cwd=workdir, ranks=1)


def run_config(run_dir: Path) -> dict[str, Any]:
    """config.yaml without logging.output_dir, the one flag the entry points were given differently.

    Paths under the output dir (a layout file written into the run directory) are made relative to it: they name the
    same file of each run.
    """
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    output_dir = config["logging"].pop("output_dir").rstrip("/")
    return under_output_dir(config, output_dir)


def under_output_dir(value: Any, output_dir: str) -> Any:
    if isinstance(value, dict):
        return {key: under_output_dir(item, output_dir) for key, item in value.items()}
    if isinstance(value, list):
        return [under_output_dir(item, output_dir) for item in value]
    if isinstance(value, str) and (value == output_dir or value.startswith(output_dir + "/")):
        return "<output_dir>" + value.removeprefix(output_dir)
    return value


def losses(run_dir: Path) -> list[float]:
    logs, _ = read_metrics(run_dir)
    assert [r["step"] for r in logs] == [1, 2, 3, 4], run_dir
    return [r["loss"] for r in logs]


@pytest.mark.slow
def test_every_entry_point_trains_the_same_run(workdir: Path, tokenizer_file: Path) -> None:
    entries = ("cli", "plain", "torchrun", "deepspeed")
    runs = {entry: start(entry, workdir, tokenizer_file) for entry in entries}
    assert {entry: proc.returncode for entry, proc in runs.items()} == dict.fromkeys(entries, 0)
    dirs = {entry: workdir / f"runs_{entry}" / NAME for entry in entries}
    missing = {entry: [f for f in RUN_FILES if not (d / f).exists()] for entry, d in dirs.items()}
    assert missing == {entry: [] for entry in entries}
    # the launcher-started runs compared with the console script's, each on its own so a mismatch names its entry
    reference = dirs["cli"]
    for entry in entries[1:]:
        assert run_config(dirs[entry]) == run_config(reference), f"config.yaml: {entry} vs cli"
        ds_configs = [json.loads((d / "ds_config.json").read_text()) for d in (dirs[entry], reference)]
        assert ds_configs[0] == ds_configs[1], f"ds_config.json: {entry} vs cli"
        assert losses(dirs[entry]) == pytest.approx(losses(reference), abs=1e-6), f"loss: {entry} vs cli"
