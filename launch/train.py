"""DeepSpeed entry point: `deepspeed --num_gpus N launch/train.py --preset debug ...` (same flags as `lumina-ds train`).

Also runs under torchrun, mpirun, or alone (it then sets the rendezvous variables itself).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from lumina_ds.cli_train import add_train_arguments, run_config_from_args
from lumina_ds.distributed.env import configure_accelerator
from lumina_ds.errors import LuminaError


def main() -> int:
    configure_accelerator()
    parser = argparse.ArgumentParser(description="lumina-ds training under a distributed launcher")
    add_train_arguments(parser)
    args = parser.parse_args()
    try:
        from lumina_ds.training.session import train

        train(run_config_from_args(args))
    except LuminaError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    from lumina_ds.distributed.env import exit_process

    exit_process(main())
