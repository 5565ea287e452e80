"""`lumina-ds train` under a distributed launcher: `deepspeed --num_gpus N launch/train.py --preset debug ...`.

This file is `lumina-ds train`, nothing else: the same flags, the same resolved run config, the same training, under
deepspeed, torchrun, mpirun, srun, or alone (it then sets the rendezvous variables itself).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from lumina_ds.cli import entry

if __name__ == "__main__":
    entry(["train", *sys.argv[1:]])
