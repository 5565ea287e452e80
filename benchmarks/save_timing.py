"""What a save costs with and without the consolidated weights, what listing it cost when every file was read back
for its checksum, and what writing a tag's weights later (chat, export) costs.

One process trains PRESET for 3 steps with a save after each, once per `--consolidate` mode; the first save's time is
the line the run prints. Then: every file of the last tag hashed by reading (the second read a save made before the
checksums were computed while writing), and `ensure_weights` on a tag saved without weights.

    python benchmarks/save_timing.py --preset m70_memory --zero-stage 1      # ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lumina_ds.run_dir import list_complete_tags
from lumina_ds.training.checkpoint_files import file_digest, tag_files
from lumina_ds.training.tag_weights import ensure_weights

ROOT = Path(__file__).resolve().parents[1]
SAVED = re.compile(r"checkpoint saved in ([\d.]+)s")


def train(workdir: Path, name: str, args: argparse.Namespace, consolidate: str) -> tuple[float, Path]:
    """The first save's seconds as the run printed them, and the run dir."""
    cmd = [sys.executable, "-m", "lumina_ds", "train", "--preset", args.preset, "--seq-len", "128",
           "--micro-batch-size", "2", "--train-data", str(ROOT / "examples" / "conversations.jsonl"),
           "--max-steps", "3", "--save-every-n-steps", "1", "--zero-stage", str(args.zero_stage), "--precision",
           "fp32", "--no-progress-bar", "--no-tensorboard", "--experiment-name", name,
           "--consolidate", consolidate]  # fmt: skip
    done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=1800)
    match = SAVED.search(done.stdout)
    if done.returncode != 0 or match is None:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-3000:])
    return float(match.group(1)), workdir / "runs" / name


def read_back_seconds(tag: Path) -> tuple[float, int]:
    files = tag_files(tag)
    started = time.perf_counter()
    for path in files:
        file_digest(path)
    return time.perf_counter() - started, sum(p.stat().st_size for p in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="m70_memory")
    parser.add_argument("--zero-stage", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        every, _ = train(workdir, "every", args, "every")
        final, run = train(workdir, "final", args, "final")
        first = run / "checkpoints" / list_complete_tags(run / "checkpoints")[0]
        read_s, size = read_back_seconds(first)
        started = time.perf_counter()
        ensure_weights(first, log=lambda _: None)
        later = time.perf_counter() - started
    print(f"{args.preset}, ZeRO-{args.zero_stage}, fp32, 1 process; a tag without weights: {size / 2**20:,.0f} MiB")
    print("| save | seconds |\n|---|---|")
    print(f"| `--consolidate every` (DeepSpeed states + consolidated weights) | {every:.2f} |")
    print(f"| `--consolidate final`, a save before the last (DeepSpeed states only) | {final:.2f} |")
    print(f"| reading the tag back for its checksums (what each save did before) | {read_s:.2f} |")
    print(f"| writing that tag's weights later (`ensure_weights`, as chat/export do) | {later:.2f} |")


if __name__ == "__main__":
    main()
