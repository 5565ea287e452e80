"""Elastic resume's universal conversion split across W processes, and what each rank reads when it loads the result.

Conversion: for W in --worlds, W share processes at once and then the finish (training/universal_split.py, as
elastic resume runs them), against DeepSpeed's own converter in one process (with its 2 workers, the path before the
split). Before each run the tag's pages are dropped from the page cache (fsync, then POSIX_FADV_DONTNEED), so that
the bytes each process reads from the disk (getrusage's ru_inblock) are its own; the peak bytes on disk under the
conversion's folder are sampled every 20 ms (temporary fragments included).

Load (--load-ranks): `lumina-ds train --resume TAG` on N ranks, each measuring the bytes it reads from the disk
(/proc/self/io read_bytes) while DeepSpeed loads the universal checkpoint, with the conversion's pages dropped first;
with the files mapped (mmap, the default) and read whole (DeepSpeed's torch.load).

    python benchmarks/universal_scaling.py --tag runs/x/checkpoints/step_00000001 --worlds 1 2 4 --load-ranks 2 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def drop_cache(folder: Path) -> None:
    """The folder's clean pages out of the page cache: what a process reads next comes from the disk."""
    os.sync()
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):  # removed meanwhile
                total += os.stat(os.path.join(dirpath, name)).st_size
    return total


class PeakSampler:
    """The largest size the folder reached while it ran (sampled)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.peak, self._stop = folder, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, folder_bytes(self.folder))
            time.sleep(0.02)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, folder_bytes(self.folder))


def run_all(commands: list[list[str]]) -> list[tuple[float, int]]:
    """Start the commands together; each one's (seconds, bytes read from the disk)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    started = time.perf_counter()
    procs = {}
    for command in commands:
        log = tempfile.TemporaryFile()  # noqa: SIM115  (not a pipe: nobody reads it while the process runs)
        procs[subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log).pid] = (command, log)
    done: dict[int, tuple[float, int]] = {}
    while len(done) < len(procs):
        pid, status, usage = os.wait4(-1, 0)
        if pid not in procs:
            continue
        command, log = procs[pid]
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-2000:]
            raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(command)}\n{tail}")
        done[pid] = (time.perf_counter() - started, usage.ru_inblock * 512)
    return [done[pid] for pid in procs]


def split_conversion(tag: Path, work: Path, world: int, *, together: bool) -> dict[str, Any]:
    """W shares started together (this machine's cores shared by all), or one after another with the page cache
    dropped before each (what each rank costs on a node of its own: its time and reads are its alone)."""
    out = work / "step"
    shutil.rmtree(work, ignore_errors=True)
    out.mkdir(parents=True)
    base = [PY, "-m", "lumina_ds.training.universal_split", "--input", str(tag), "--output", str(out)]
    commands = [[*base, "--rank", str(r), "--world", str(world)] for r in range(world)]
    started = time.perf_counter()
    with PeakSampler(work) as sampler:
        if together:
            drop_cache(tag)
            shares = run_all(commands)
        else:
            shares = []
            for command in commands:
                drop_cache(tag)
                shares += run_all([command])
        drop_cache(tag)
        finish = run_all([[*base, "--finish"]])[0]
    written = [sum(f["size"] for f in json.loads((work / f"digests.share.{r}.json").read_text())["files"].values())
               for r in range(world)]  # fmt: skip
    return {
        "mode": f"split W={world}, {'together' if together else 'one at a time'}",
        "seconds": time.perf_counter() - started, "share_s": [s for s, _ in shares], "finish_s": finish[0],
        "read_per_share": [b for _, b in shares], "read_finish": finish[1], "written": written,
        "peak": sampler.peak, "output": folder_bytes(out),
    }  # fmt: skip


def deepspeed_conversion(tag: Path, work: Path) -> dict[str, Any]:
    out = work / "step"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    drop_cache(tag)
    command = [PY, "-m", "lumina_ds.training.universal", "--input_folder", str(tag), "--output_folder", str(out),
               "--inject_missing_state", "--num_extract_workers", "2", "--num_merge_workers", "2"]  # fmt: skip
    started = time.perf_counter()
    with PeakSampler(work) as sampler:
        ((_, read),) = run_all([command])
    seconds = time.perf_counter() - started
    return {"mode": "DeepSpeed, 1 process (2 workers)", "seconds": seconds, "share_s": [seconds], "finish_s": 0.0,
            "read_per_share": [read], "read_finish": 0, "written": [folder_bytes(out)], "peak": sampler.peak,
            "output": folder_bytes(out)}  # fmt: skip


def tag_bytes(tag: Path) -> int:
    return sum(int(f["size"]) for f in json.loads((tag / "complete.json").read_text())["files"].values())


def conversions(tag: Path, worlds: list[int], work: Path) -> list[dict[str, Any]]:
    rows = [deepspeed_conversion(tag, work / "ds")]
    rows += [split_conversion(tag, work / f"w{w}", w, together=False) for w in worlds]
    rows += [split_conversion(tag, work / f"w{w}t", w, together=True) for w in worlds if w > 1]
    size = tag_bytes(tag)
    mib = lambda values: ", ".join(f"{v / 2**20:.0f}" for v in values)  # noqa: E731
    print(f"tag {tag}: {size / 2**20:.0f} MiB; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(
        "| conversion | wall s | s per share | finish s | MiB read per share | MiB written per share | finish MiB "
        "read | peak on disk / tag | output / tag |"
    )
    print("|---|---:|---|---:|---|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['seconds']:.1f} | {', '.join(f'{s:.1f}' for s in r['share_s'])} | "
            f"{r['finish_s']:.1f} | {mib(r['read_per_share'])} | {mib(r['written'])} | "
            f"{r['read_finish'] / 2**20:.0f} | {r['peak'] / size:.2f} | {r['output'] / size:.2f} |",
            flush=True,
        )
    return rows


# ---- load -----------------------------------------------------------------------------------------------------
def _read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def probe(argv: list[str]) -> None:
    """One rank of `lumina-ds ARGV`, printing the bytes it read from the disk while loading the universal tag."""
    import torch.distributed as dist

    from lumina_ds.cli import entry
    from lumina_ds.training import elastic, universal

    universal.MMAP_LOADS = os.environ["PROBE_MMAP"] == "1"
    load = elastic.UniversalLoader.load

    def measured(self: Any, engine: Any, tag_dir: Path) -> Any:
        if tag_dir != self.tag_dir:
            return load(self, engine, tag_dir)
        # each rank its own copy: on one machine the ranks would share the page cache, and a page one rank read
        # would cost the next nothing (on a node of its own it would)
        own = self.converted.parent / f"{self.converted.name}.rank{dist.get_rank()}"
        shutil.copytree(self.converted, own)
        self.converted = own
        drop_cache(own)
        dist.barrier()  # nobody reads before every rank dropped its pages
        before = _read_bytes()
        load(self, engine, tag_dir)
        read = _read_bytes() - before
        dist.barrier()  # every rank has loaded: nothing more is measured, no step is trained
        print(f"PROBE rank {dist.get_rank()} read {read}", flush=True)
        os._exit(0)

    elastic.UniversalLoader.load = measured  # type: ignore[method-assign]
    entry(argv)


def loads(tag: Path, ranks: int, mmap: bool, argv: list[str], work: Path) -> list[int]:
    from lumina_ds.distributed.env import free_port

    port, procs = free_port(), []
    for rank in range(ranks):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
               "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PROBE_MMAP": "1" if mmap else "0"}  # fmt: skip
        command = [PY, str(Path(__file__).resolve()), "--probe", *argv, "--resume", str(tag)]
        procs.append(
            subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    read = {}
    for p in procs:
        out, err = p.communicate()
        for line in out.splitlines():
            if line.startswith("PROBE rank"):
                read[int(line.split()[2])] = int(line.split()[4])
        if p.returncode != 0 and not read:
            raise SystemExit(err[-3000:])
    return [read[r] for r in sorted(read)]


def slice_reads(work: Path, mib: int, world: int) -> None:
    """One universal fp32.pt of `mib` MiB, as DeepSpeed's loaders take a rank's 1/world of it (torch.load, then a
    narrow and a copy): the bytes read from the disk, mapped and whole, for each rank on its own (pages dropped)."""
    import torch

    work.mkdir(parents=True, exist_ok=True)
    path = work / "fp32.pt"
    torch.save({"param": torch.randn(mib * 2**18)}, path)
    print("| file MiB | ranks | files | MiB read per rank (each alone) |\n|---:|---:|---|---|")
    for mmap in (True, False):
        read = []
        for rank in range(world):
            drop_cache(work)
            before = _read_bytes()
            flat = torch.load(path, weights_only=True, mmap=mmap)["param"]
            part = flat.numel() // world
            flat.narrow(0, rank * part, part).clone()
            read.append(_read_bytes() - before)
            del flat
        shown = ", ".join(f"{b / 2**20:.0f}" for b in read)
        print(f"| {mib} | {world} | {'mapped' if mmap else 'read whole'} | {shown} |", flush=True)
    path.unlink()


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--probe":
        probe(argv[1:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tag", required=True, type=Path)
    p.add_argument("--worlds", type=int, nargs="*", default=[1, 2, 4], help="none: the loads only")
    p.add_argument("--work", type=Path, default=Path("/tmp/universal_scaling"))
    p.add_argument("--load-ranks", type=int, nargs="*", default=[])
    p.add_argument("--slice-mib", type=int, default=0, help="also: one tensor of this size sliced by --load-ranks")
    p.add_argument("--train-args", default="", help="the resumed run's arguments (preset, data, sizes, --max-steps)")
    args = p.parse_args(argv)
    tag = args.tag.resolve()
    if args.slice_mib:
        for n in args.load_ranks:
            slice_reads(args.work / "slice", args.slice_mib, n)
        return
    if args.worlds:
        conversions(tag, args.worlds, args.work)
    shutil.rmtree(args.work, ignore_errors=True)
    if args.load_ranks:
        print("| load ranks | files | MiB read per rank | universal checkpoint MiB |")
        print("|---:|---|---|---:|")
    for n in args.load_ranks:
        for mmap in (True, False):
            work = args.work / f"load{n}{mmap}"
            work.mkdir(parents=True, exist_ok=True)
            read = loads(tag, n, mmap, [*args.train_args.split(), "--experiment-name", "probe"], work)
            universal = work / "runs" / "probe" / "checkpoints" / ".universal"
            total = folder_bytes(universal) / max(1, len(list(universal.iterdir())))  # one copy per rank
            shown = ", ".join(f"{b / 2**20:.0f}" for b in read)
            print(f"| {n} | {'mapped' if mmap else 'read whole'} | {shown} | {total / 2**20:.0f} |", flush=True)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
