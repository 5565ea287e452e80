"""Fault drill: random SIGKILLs against a 2-rank CPU run of the `debug` preset, an `--auto-resume` after each, and the
kill-riddled run's per-step losses and data positions compared with an uninterrupted reference run of the same steps.

Kinds of kill, chosen at random:
- one-rank: SIGKILL of one rank (0 or 1) after a random step; the launcher then takes the other rank down;
- all-ranks: SIGKILL of every process of the job (launcher and ranks), as when a node is lost;
- in-save: SIGKILL of every process while a save is in progress (a `.step_*.saving-*` staging dir exists), after a
  random delay of up to 10 ms into it.

Printed: kills survived (the next launch resumed from a complete tag and went on), resumes exact (every loss the
resumed launch logged equals the reference's to 1e-5), data lost (every saved tag's per-rank data position against
the reference's at the same step, and the tokens of every step; 0 means no row skipped or repeated) and the time
each kill cost: from the kill until the resumed run logs again the last step logged before it (restart + redone
steps).

    python benchmarks/fault_drill.py --kills 10 --seed 0     # ~5 minutes on 2 cores
    python benchmarks/fault_drill.py --kills 10 --backup     # with --backup-dir; every backup verified at the end
    python benchmarks/fault_drill.py --extra-flags=--no-divergence-guard   # more `train` flags for both runs
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lumina_ds.distributed.env import free_port  # noqa: E402
from lumina_ds.run_dir import COMPLETE_MARKER, list_complete_tags  # noqa: E402
from lumina_ds.training.checkpoint_files import file_problems  # noqa: E402

KINDS = ("one-rank", "all-ranks", "in-save")
TOLERANCE = 1e-5
POLL_S = 0.005
IN_SAVE_DELAY_S = 0.01  # a debug save's staging dir lives 22-772 ms, median 54 ms (measured): most kills land in it
STAGING = re.compile(r"^\.step_(\d+)\.saving-")
RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")


@dataclass
class Kill:
    kind: str
    rank: int | None  # the rank killed alone (one-rank)
    step: int  # the last step logged before the kill
    in_save: bool  # a staging dir existed when the kill landed
    killed_at: float = 0.0  # wall time
    teardown_s: float = 0.0  # kill -> every process of the job gone
    resumed_at: int | None = None  # the step the next launch resumed from (0: started afresh)
    lost_s: float | None = None  # kill -> the resumed run logs `step` again (restart + redone steps)
    restart_s: float | None = None  # launch -> first step logged, less one step


@dataclass
class Segment:
    """One launch of the drill run: its log, the metrics it appended and when each step first appeared."""

    launched: float
    offset: int
    log: Path
    seen: dict[int, float] = field(default_factory=dict)  # step -> wall time it was first read
    records: list[dict[str, Any]] = field(default_factory=list)


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def train_command(flags: list[str]) -> list[str]:
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port())]
    return [*launcher, str(ROOT / "launch" / "train.py"), *flags]


def common_flags(args: argparse.Namespace, workdir: Path) -> list[str]:
    train = str(ROOT / "examples" / "conversations.jsonl")
    flags = ["--preset", "debug", "--seq-len", "128", "--micro-batch-size", "4", "--log-every-n-steps", "1",
             "--train-data", train, "--precision", "fp32", "--zero-stage", str(args.zero_stage), "--max-steps",
             str(args.steps), "--save-every-n-steps", str(args.save_every), "--save-total-limit",
             str(args.steps // args.save_every + 2),
             "--no-progress-bar", "--no-tensorboard", "--output-dir", str(workdir / "runs")]  # fmt: skip
    return flags


def read_new(path: Path, segment: Segment) -> None:
    """Records appended since the segment's last read (whole lines only), stamping when each step appeared."""
    if not path.exists():
        return
    with path.open("rb") as handle:
        handle.seek(segment.offset)
        data = handle.read()
    end = data.rfind(b"\n") + 1
    segment.offset += end
    now = time.time()
    for line in data[:end].splitlines():
        record = json.loads(line)
        if "loss" in record:
            segment.records.append(record)
            segment.seen.setdefault(int(record["step"]), now)


def staging_step(checkpoints: Path) -> int | None:
    """The step of a save in progress, or None."""
    try:
        names = os.listdir(checkpoints)
    except FileNotFoundError:
        return None
    found = [int(m.group(1)) for name in names if (m := STAGING.match(name))]
    return max(found) if found else None


def job_processes(launcher: subprocess.Popen[bytes]) -> list[psutil.Process]:
    try:
        root = psutil.Process(launcher.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def rank_process(launcher: subprocess.Popen[bytes], rank: int) -> psutil.Process | None:
    for proc in job_processes(launcher)[1:]:
        try:
            if f"--local_rank={rank}" in " ".join(proc.cmdline()):
                return proc
        except psutil.NoSuchProcess:
            continue
    return None


def kill_all(launcher: subprocess.Popen[bytes]) -> None:
    procs = job_processes(launcher)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)
    launcher.wait(timeout=30)


def numeric_gap(a: Any, b: Any) -> float:
    """Sum of |a - b| over the numbers of two data positions (0 when equal); a difference in structure is inf."""
    if isinstance(a, dict) and isinstance(b, dict):
        return sum(numeric_gap(a[k], b[k]) for k in a) if a.keys() == b.keys() else float("inf")
    if isinstance(a, list) and isinstance(b, list):
        return sum(numeric_gap(x, y) for x, y in zip(a, b, strict=True)) if len(a) == len(b) else float("inf")
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return abs(a - b)
    return 0.0 if a == b else float("inf")


def tag_position_gap(ours: Path, theirs: Path, tag: str) -> tuple[float, int]:
    """The per-rank data positions saved in one tag of two checkpoints dirs: sum |diff|, rank states compared."""
    gap, compared = 0.0, 0
    for state in sorted((theirs / tag / "lumina_state").glob("rank*.json")):
        mine = json.loads((ours / tag / "lumina_state" / state.name).read_text())["data"]
        gap += numeric_gap(mine, json.loads(state.read_text())["data"])
        compared += 1
    return gap, compared


class Drill:
    """The reference run, then the drill run: launch with --auto-resume, kill, repeat; then one launch to the end."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args, self.workdir = args, workdir
        self.rng = random.Random(args.seed)
        self.run_dir = workdir / "runs" / "drill"
        self.reference_dir = workdir / "runs" / "reference"
        self.segments: list[Segment] = []
        self.kills: list[Kill] = []
        self.final_exit: int | None = None

    def flags(self, experiment: str) -> list[str]:
        flags = [*common_flags(self.args, self.workdir), "--experiment-name", experiment]
        flags += shlex.split(self.args.extra_flags)
        if experiment == "drill":  # the reference's tokenizer: the two runs tokenize alike by construction
            flags += ["--auto-resume", "--tokenizer", str(self.reference_dir / "tokenizer.json")]
            if self.args.backup:
                flags += ["--backup-dir", str(self.workdir / "backup")]
        return flags

    def run_reference(self) -> None:
        log = self.workdir / "reference.log"
        with log.open("wb") as out:
            done = subprocess.run(train_command(self.flags("reference")), cwd=self.workdir, env=child_env(),
                                  stdout=out, stderr=subprocess.STDOUT, timeout=1800)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"the reference run failed (exit {done.returncode}): see {log}")

    def launch(self) -> tuple[subprocess.Popen[bytes], Segment]:
        metrics = self.run_dir / "metrics.jsonl"
        segment = Segment(time.time(), metrics.stat().st_size if metrics.exists() else 0,
                          self.workdir / f"drill-{len(self.segments)}.log")  # fmt: skip
        with segment.log.open("wb") as out:
            proc = subprocess.Popen(train_command(self.flags("drill")), cwd=self.workdir, env=child_env(), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.segments.append(segment)
        return proc, segment

    def run(self) -> None:
        self.run_reference()
        for _ in range(self.args.kills):
            kill = self.one_kill(self.rng.choice(KINDS))
            if kill is None:  # the run ended before the kill could land
                break
            self.kills.append(kill)
        proc, segment = self.launch()
        while proc.poll() is None:
            read_new(self.run_dir / "metrics.jsonl", segment)
            time.sleep(POLL_S * 4)
        read_new(self.run_dir / "metrics.jsonl", segment)
        self.final_exit = proc.returncode

    def one_kill(self, kind: str) -> Kill | None:
        """Launch, wait for the moment this kind of kill is due, kill; None when the launch ended first."""
        ahead, rank, delay = self.rng.randint(1, 2 * self.args.save_every), self.rng.randint(0, 1), self.rng.random()
        floor = self.kills[-1].step if self.kills else 0  # past the last kill: each launch makes progress
        proc, segment = self.launch()
        checkpoints = self.run_dir / "checkpoints"
        while proc.poll() is None:
            read_new(self.run_dir / "metrics.jsonl", segment)
            saving = staging_step(checkpoints)
            if kind == "in-save" and segment.seen and saving is not None and saving > floor:
                time.sleep(delay * IN_SAVE_DELAY_S)
                break
            if (
                kind != "in-save"
                and segment.seen
                and max(segment.seen) >= max(min(segment.seen) - 1 + ahead, floor + 1)
            ):
                break
            time.sleep(POLL_S)
        if proc.poll() is not None:
            read_new(self.run_dir / "metrics.jsonl", segment)
            self.final_exit = proc.returncode
            return None
        return self.kill(proc, segment, kind=kind, rank=rank)

    def kill(self, proc: subprocess.Popen[bytes], segment: Segment, *, kind: str, rank: int) -> Kill:
        if kind == "one-rank":
            victim = rank_process(proc, rank)
            assert victim is not None, "rank process not found"
            victim.send_signal(signal.SIGKILL)
        else:
            kill_all(proc)
        killed_at = time.time()
        in_save = staging_step(self.run_dir / "checkpoints") is not None
        try:
            proc.wait(timeout=120)  # one-rank: the launcher takes the other rank down
        except subprocess.TimeoutExpired:
            print(f"warning: the job did not end within 120 s of the kill of rank {rank}; killing it", flush=True)
        kill_all(proc)
        teardown = time.time() - killed_at
        read_new(self.run_dir / "metrics.jsonl", segment)
        step = max(r["step"] for r in segment.records)
        return Kill(kind, rank if kind == "one-rank" else None, step, in_save, killed_at, teardown)

    # ---- what the kills cost and whether anything was lost --------------------------------------------------
    def step_seconds(self) -> float:
        """The reference's median step time (log every step: the difference of consecutive elapsed times)."""
        records = [r for r in read_records(self.reference_dir) if "loss" in r]
        gaps = [b["elapsed_s"] - a["elapsed_s"] for a, b in itertools.pairwise(records)]
        return statistics.median(gaps) if gaps else 0.0

    def measure_time_lost(self) -> None:
        step_s = self.step_seconds()
        for kill, segment in zip(self.kills, self.segments[1:], strict=True):
            match = RESUMED.search(segment.log.read_text(errors="replace"))
            kill.resumed_at = int(match.group(2)) if match else 0
            if kill.step > kill.resumed_at and kill.step in segment.seen:
                kill.lost_s = segment.seen[kill.step] - kill.killed_at
            elif kill.resumed_at + 1 in segment.seen:
                kill.lost_s = segment.seen[kill.resumed_at + 1] - step_s - kill.killed_at
            if segment.seen:
                kill.restart_s = min(segment.seen.values()) - segment.launched - step_s

    def loss_gaps(self) -> list[tuple[float, int | None]]:
        """Per launch after a kill: the largest |loss - reference loss| over the steps it logged, and the first step
        off by more than the tolerance (a step the reference skipped, or the other way round, counts as off)."""
        reference = {r["step"]: r["loss"] for r in read_records(self.reference_dir) if "loss" in r}
        gaps = []
        for segment in self.segments[1:]:
            off = [(abs(r["loss"] - reference[r["step"]]) if r["step"] in reference else float("inf"), r["step"])
                   for r in segment.records]  # fmt: skip
            logged = {r["step"] for r in segment.records}
            off += [(float("inf"), step) for step in reference if min(logged, default=0) < step < max(logged, default=0)
                    and step not in logged]  # fmt: skip
            bad = sorted(step for gap, step in off if gap > TOLERANCE)
            gaps.append((max((gap for gap, _ in off), default=float("inf")), bad[0] if bad else None))
        return gaps

    def data_gaps(self) -> dict[str, Any]:
        """Saved data positions against the reference's at the same steps, and tokens per step of the final lineage."""
        ours, theirs = self.run_dir / "checkpoints", self.reference_dir / "checkpoints"
        common = sorted(set(list_complete_tags(ours)) & set(list_complete_tags(theirs)))
        gaps = [tag_position_gap(ours, theirs, tag) for tag in common]
        position_gap, compared = sum(gap for gap, _ in gaps), sum(n for _, n in gaps)
        final = {}
        for segment in self.segments:  # a later launch's record of a step replaces an earlier one's
            final.update({r["step"]: r["tokens"] for r in segment.records})
        reference = {r["step"]: r["tokens"] for r in read_records(self.reference_dir) if "loss" in r}
        token_gap = sum(abs(final.get(step, 0) - tokens) for step, tokens in reference.items())
        return {"tags": len(common), "positions": compared, "position_gap": position_gap, "token_gap": token_gap,
                "steps": len(reference), "steps_logged": len(set(final) & set(reference))}  # fmt: skip

    def check_backups(self) -> dict[str, Any]:
        """Every backup left in the backup dir verifies against its manifest; no staging copy is left behind."""
        root = self.workdir / "backup" / "drill"
        tags = list_complete_tags(root)
        bad = [
            t for t in tags if file_problems(root / t, json.loads((root / t / COMPLETE_MARKER).read_text())["files"])
        ]
        left = [p.name for p in root.iterdir() if p.name.startswith(".")] if root.is_dir() else []
        return {"backups": len(tags), "failing": bad, "staging_left": left}


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summarize(drill: Drill) -> dict[str, Any]:
    drill.measure_time_lost()
    rows = drill.loss_gaps()
    gaps, first_off = [gap for gap, _ in rows], [step for _, step in rows]
    survived = [
        bool(s.seen) and max(s.seen) > (k.resumed_at or 0) for k, s in zip(drill.kills, drill.segments[1:], strict=True)
    ]
    lost = [k.lost_s for k in drill.kills if k.lost_s is not None]
    restarts = [k.restart_s for k in drill.kills if k.restart_s is not None]
    summary: dict[str, Any] = {
        "kills": len(drill.kills),
        "survived": sum(survived),
        "final_exit": drill.final_exit,
        "resumes_exact": sum(g <= TOLERANCE for g in gaps),
        "max_loss_gap": max(gaps, default=0.0),
        "data": drill.data_gaps(),
        "time_lost_mean_s": statistics.mean(lost) if lost else None,
        "time_lost_max_s": max(lost, default=None),
        "restart_mean_s": statistics.mean(restarts) if restarts else None,
        "teardown_mean_s": statistics.mean(k.teardown_s for k in drill.kills) if drill.kills else None,
        "redone_steps_mean": statistics.mean(k.step - (k.resumed_at or 0) for k in drill.kills) if drill.kills else 0,
        "per_kill": [
            {**asdict(k), "first_step_off_after_resume": off} for k, off in zip(drill.kills, first_off, strict=True)
        ],
    }
    if drill.args.backup:
        summary["backups"] = drill.check_backups()
    return summary


def print_report(args: argparse.Namespace, summary: dict[str, Any], drill: Drill) -> None:
    extra = f", {args.extra_flags}" if args.extra_flags else ""
    print(f"fault drill: {args.kills} kills asked, seed {args.seed}, 2 ranks (ZeRO {args.zero_stage}, fp32, debug"
          f"{extra}), {args.steps} steps, a save every {args.save_every} steps")  # fmt: skip
    print(f"{'kill':>4}  {'kind':<9}  {'rank':>4}  {'step':>4}  {'in save':<7}  {'resumed at':>10}  {'redone':>6}  "
          f"{'time lost':>9}  resumed run vs reference")  # fmt: skip
    for i, (kill, row) in enumerate(zip(drill.kills, summary["per_kill"], strict=True), 1):
        lost = f"{kill.lost_s:.1f} s" if kill.lost_s is not None else "n/a"
        off = row["first_step_off_after_resume"]
        print(f"{i:>4}  {kill.kind:<9}  {kill.rank if kill.rank is not None else '-':>4}  {kill.step:>4}  "
              f"{'yes' if kill.in_save else 'no':<7}  {kill.resumed_at:>10}  {kill.step - (kill.resumed_at or 0):>6}  "
              f"{lost:>9}  {'exact' if off is None else f'off from step {off}'}")  # fmt: skip
    n, data = summary["kills"], summary["data"]
    print(f"kills survived: {summary['survived']}/{n} (the final launch exited {summary['final_exit']})")
    print(f"resumes exact: {summary['resumes_exact']}/{n} (largest |loss - reference| after a resume: "
          f"{summary['max_loss_gap']:.2e}, tolerance {TOLERANCE:g})")  # fmt: skip
    print(f"data lost: {data['position_gap'] + data['token_gap']:g} (data positions of {data['positions']} rank "
          f"states in {data['tags']} tags against the reference's: sum |diff| {data['position_gap']:g}; tokens of "
          f"{data['steps_logged']}/{data['steps']} steps: sum |diff| {data['token_gap']})")  # fmt: skip
    if summary["time_lost_mean_s"] is not None:
        print(f"time lost per kill: mean {summary['time_lost_mean_s']:.1f} s, max {summary['time_lost_max_s']:.1f} s "
              f"(job teardown mean {summary['teardown_mean_s']:.1f} s, restart mean {summary['restart_mean_s']:.1f} s, "
              f"{summary['redone_steps_mean']:.1f} steps redone on average)")  # fmt: skip
    if "backups" in summary:
        b = summary["backups"]
        print(f"backups: {b['backups'] - len(b['failing'])}/{b['backups']} verify against their manifests, "
              f"{len(b['staging_left'])} staging copies left")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kills", type=int, default=10, help="random kills (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="chooses the kinds, ranks and moments of the kills")
    p.add_argument("--steps", type=int, help="optimizer steps of both runs (default: 2 x save-every x (kills + 2))")
    p.add_argument("--save-every", type=int, default=2, help="--save-every-n-steps of both runs (default: 2)")
    p.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3), help="(default: 2, debug's)")
    p.add_argument(
        "--extra-flags",
        default="",
        help="more `lumina-ds train` flags for both runs, after an =: --extra-flags='--top-k 1'",
    )
    p.add_argument("--backup", action="store_true", help="the drill run backs up every checkpoint (--backup-dir)")
    p.add_argument("--workdir", type=Path, help="keep the runs and logs here (default: a temporary directory)")
    p.add_argument("--output", type=Path, help="write the summary as JSON here")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 2 * args.save_every * (args.kills + 2)  # each kill lands within 2 saves of the last one
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fault-drill-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        drill = Drill(args, workdir)
        drill.run()
        summary = summarize(drill)
    print_report(args, summary, drill)
    if args.output:
        args.output.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
