"""DeepSpeed entry point: `deepspeed --num_gpus N launch/train.py --preset debug ...` (same flags as `lumina-ds train`).

Also runs under torchrun, mpirun, srun, or alone (it then sets the rendezvous variables itself). With `--preset X` and
no `--deepspeed-config`, the layout planned for X (`ds_configs/X.json`: ZeRO stage, expert-parallel size, micro-batch,
accumulation, recompute, buckets, offload) is used; flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from lumina_ds.cli_train import FLAG_FIELDS, add_train_arguments, run_config_from_args
from lumina_ds.config.run import RunConfig
from lumina_ds.distributed.env import configure_accelerator, ensure_rendezvous_env
from lumina_ds.errors import LuminaError

DS_CONFIGS = Path(__file__).resolve().parent.parent / "ds_configs"


def adopt_preset_file(run: RunConfig, args: argparse.Namespace) -> None:
    """Use ds_configs/<preset>.json for this run, its batch keys recomputed for the real number of processes."""
    from lumina_ds.distributed.preset_configs import adopt_preset_config, write_adopted_config

    path = DS_CONFIGS / f"{args.preset}.json"
    if not path.exists():
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    explicit = {dest for dest in FLAG_FIELDS if getattr(args, dest, None) is not None}
    override, notes = adopt_preset_config(run, json.loads(path.read_text()), world_size=world, explicit=explicit)
    run.distributed.deepspeed_config = str(write_adopted_config(run, override))
    if os.environ.get("RANK", "0") == "0":
        print(f"DeepSpeed config: {path} (planned layout; --deepspeed-config FILE to use another)", flush=True)
        for note in notes:
            print(f"  {note}", flush=True)
    run.validate()


def main() -> int:
    configure_accelerator()
    parser = argparse.ArgumentParser(description="lumina-ds training under a distributed launcher")
    add_train_arguments(parser)
    args = parser.parse_args()
    try:
        from lumina_ds.training.session import train

        ensure_rendezvous_env()  # WORLD_SIZE under every launcher, before the preset file is adopted
        run = run_config_from_args(args)
        if args.preset and not args.deepspeed_config:
            adopt_preset_file(run, args)
        train(run)
    except LuminaError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    from lumina_ds.distributed.env import exit_process

    exit_process(main())
