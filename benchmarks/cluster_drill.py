"""Fault drill over two hosts made of Linux namespaces (tests/cluster/harness.py): a 4-rank `debug` run (2 hosts x 2
ranks, fp32, EP 2, ZeRO-2, --auto-resume) launched by torchrun (static rendezvous, one --rdzv-id) or by
`sbatch launch/slurm/train.sbatch` on the harness's SLURM, struck by events, and compared with an uninterrupted
reference run of the same steps on the same hosts (benchmarks/fault_drill.py's comparisons).

Events:
- host-kill: SIGKILL to every process of one host (a node failure) after a random step; the other host's ranks must
  stop with E308 naming the lost ranks within 60 s;
- rank-kill: SIGKILL to one training rank on one host;
- save-kill: SIGKILL to every process of one host while a save is in progress (a `.step_*.saving-*` staging dir);
- slurm-requeue: `scontrol requeue` (pre-emption): SIGTERM, every rank saves and exits 143, SLURM requeues the job;
- slurm-timelimit: `scancel --signal=USR1` (the time-limit warning): every rank saves and exits 138, the script
  requeues the job.
After a torchrun event the job is relaunched, with the node ranks swapped (rank 0 on the other host) half the time.
The torchrun events come first, then the SLURM ones (each group in the order drawn or given): the SLURM daemons live in
the hosts, which a host kill would take down, and one job carries every SLURM event through its requeues. The first
sbatch after a SIGKILLed rank 0 passes --force-unlock, as its user would: the lock left names the torchrun job, not
the SLURM job, and another job's lock is honoured for 5 minutes.

Per event: survived (the next launch resumed from the newest complete tag and went on), exact (every loss it logged
equals the reference's to 1e-5), data lost (the data positions saved in the tags it wrote and the tokens of the steps
it logged, against the reference's; 0: no row skipped or repeated), time lost (from the event until the resumed run
logs again the last step logged before it), and how the job stopped (the time until every process of the job had
exited, or SLURM had requeued it; the survivors' E308 line).

    python benchmarks/cluster_drill.py --events host-kill,rank-kill,save-kill,slurm-requeue,slurm-timelimit --seed 0
    python benchmarks/cluster_drill.py --kills 6 --seed 1      # kinds drawn at random

Needs root and iproute2; SLURM events need slurm-wlm and munge (`make system-deps`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))  # scripts, not a package (tests/benchmarks is the package of that name)

from fault_drill import (  # noqa: E402
    POLL_S,
    TOLERANCE,
    Drill,
    Kill,
    Segment,
    read_new,
    read_records,
    staging_step,
    summarize,
    tag_position_gap,
)

from lumina_ds.distributed.env import free_port  # noqa: E402
from lumina_ds.run_dir import TAG_PATTERN, list_complete_tags  # noqa: E402
from tests.cluster.harness import LocalCluster, cluster_unavailable, wait_all  # noqa: E402
from tests.cluster.slurm import Slurm, slurm_unavailable  # noqa: E402
from tests.cluster.test_two_hosts import torchrun  # noqa: E402
from tests.runs import child_env  # noqa: E402

TORCHRUN_KINDS = ("host-kill", "rank-kill", "save-kill")
SLURM_KINDS = ("slurm-requeue", "slurm-timelimit")
KINDS = TORCHRUN_KINDS + SLURM_KINDS
SURVIVORS_EXIT_S = 60.0  # the bound on the survivors of a host kill (docs/launch.md, "When a node fails")
LAUNCH_TIMEOUT_S = 900.0  # any launch's progress, the reference run's included: a hang is reported, not waited out
REQUEUE_S = 180.0  # a SLURM stop until the job is pending again (ranks save within KillWait, 30 s)
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
E308 = re.compile(r"lost contact with rank\(s\) ([\d, ]+) on (\S+)")
RUN_ID = "cluster-drill"


@dataclass
class Event(Kill):
    host: str | None = None  # the host killed, or the one holding the rank killed
    stop: str = ""  # how the job stopped: the survivors' E308, or SLURM's stop reason
    newest_tag: int = 0  # the newest complete tag once the job had stopped: where the next launch must resume


@dataclass
class Launch(Segment):
    launcher: str = "torchrun"
    order: tuple[int, ...] = (0, 1)  # the host of node rank 0, 1
    out_offset: int = 0  # SLURM: where this run's part of the job's output file starts
    force_unlock: bool = False


def tag_step(tag: str) -> int:
    match = TAG_PATTERN.match(tag)
    assert match, tag
    return int(match.group(1))


def rank_pid(host_netns: str, rank: int) -> int:
    """The training process of global rank `rank` among a host's processes (torchrun's worker env holds RANK)."""
    pids = subprocess.run(["ip", "netns", "pids", host_netns], capture_output=True, text=True, timeout=30)
    for pid in map(int, pids.stdout.split()):
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.environ().get("RANK") == str(rank) and "lumina_ds" in proc.cmdline():
                return pid
    raise RuntimeError(f"rank {rank} not found in {host_netns}")


class ClusterDrill(Drill):
    """The reference run on the two hosts, then the drill run: launch, strike, repeat; then a launch to the end."""

    def __init__(
        self, args: argparse.Namespace, workdir: Path, cluster: LocalCluster, stack: contextlib.ExitStack
    ) -> None:
        super().__init__(args, workdir)
        self.cluster, self.stack = cluster, stack
        self.metrics = self.run_dir / "metrics.jsonl"
        self.slurm: Slurm | None = None
        self.job = 0  # the SLURM job carrying the SLURM events
        self.procs: list[subprocess.Popen[bytes]] = []  # the torchrun launch running, one per node rank
        self.live: Launch | None = None  # the launch running now
        self.ended = False  # the run reached its last step before an event could land

    def flags(self, experiment: str) -> list[str]:
        flags = [*super().flags(experiment), "--expert-parallel-size", "2"]
        return flags + (["--tokenizer", str(self.args.tokenizer)] if self.args.tokenizer else [])

    def start_torchrun(self, experiment: str, order: tuple[int, ...], logs: str) -> list[subprocess.Popen[bytes]]:
        hosts = [self.cluster.hosts[i] for i in order]
        master, port = hosts[0].address, free_port()
        argv, run_id = ["-m", "lumina_ds", "train", *self.flags(experiment)], f"{RUN_ID}-{experiment}"
        return [host.start([*torchrun(nodes=2, node_rank=node, master=master, port=port, run_id=run_id),
                            *argv], env=child_env(2), log=self.workdir / f"{logs}.{host.name}.log", cwd=self.workdir)
                for node, host in enumerate(hosts)]  # fmt: skip

    def run_reference(self) -> None:
        codes = wait_all(self.start_torchrun("reference", (0, 1), "reference"), timeout=LAUNCH_TIMEOUT_S)
        if codes != [0, 0]:
            raise SystemExit(f"the reference run failed (exit {codes}): see {self.workdir}/reference.host*.log")

    def new_launch(self, launcher: str, order: tuple[int, ...] = (0, 1), out_offset: int = 0) -> Launch:
        offset = self.metrics.stat().st_size if self.metrics.exists() else 0
        log = self.workdir / f"drill-{len(self.segments)}.log"
        self.live = Launch(time.time(), offset, log, launcher=launcher, order=order, out_offset=out_offset)
        self.segments.append(self.live)
        return self.live

    def torchrun_launch(self) -> Launch:
        order = (1, 0) if self.segments and self.rng.random() < 0.5 else (0, 1)
        launch = self.new_launch("torchrun", order)
        self.procs = self.start_torchrun("drill", order, launch.log.stem)
        return launch

    def slurm_launch(self) -> Launch:
        if self.slurm is None:
            self.slurm = Slurm(self.cluster, self.workdir).start()
            self.stack.callback(self.slurm.stop)
        flags, stale = self.flags("drill"), (self.run_dir / ".run.lock").exists()
        # the torchrun job's lock, left by its SIGKILLed rank 0 (see the docstring)
        flags += ["--force-unlock"] if stale else []
        env = {**child_env(2), "LUMINA_LAUNCHER": "srun", "GPUS_PER_NODE": "2",
               "HOSTFILE": str(self.workdir / "hostfile"),
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # fmt: skip
        sbatch = ["--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--open-mode=append",
                  f"--output={self.workdir}/slurm-%j.out", str(ROOT / "launch" / "slurm" / "train.sbatch")]  # fmt: skip
        launch = self.new_launch("slurm")
        launch.force_unlock = stale
        self.job = self.slurm.sbatch([*sbatch, *flags], env=env, cwd=ROOT)
        return launch

    def job_state(self) -> str:
        assert self.slurm is not None
        match = re.search(r"JobState=(\w+)", self.slurm.run("scontrol", "show", "job", str(self.job)))
        return match.group(1) if match else "UNKNOWN"

    def slurm_out(self) -> Path:
        return self.workdir / f"slurm-{self.job}.out"

    # ---- the drill ----------------------------------------------------------------------------------------------
    def run(self) -> None:
        self.run_reference()
        for kind in self.args.event_list:
            event = self.one_event(kind)
            if event is None:
                break
            self.kills.append(event)
        self.finish()

    def one_event(self, kind: str) -> Event | None:
        """Launch if nothing runs, wait until this kind of event is due, strike; None when the run ended first."""
        floor, ahead = (self.kills[-1].step if self.kills else 0), self.rng.randint(1, 2 * self.args.save_every)
        alive: Callable[[], bool]
        if kind in SLURM_KINDS:
            launch = self.live or self.slurm_launch()
            alive = lambda: self.job_state() not in ENDED  # noqa: E731
        else:
            launch = self.live or self.torchrun_launch()
            alive = lambda: all(p.poll() is None for p in self.procs)  # noqa: E731
        if not self.wait_due(kind, launch, floor, ahead, alive):
            self.ended = True
            return None
        return self.strike_slurm(kind, launch) if kind in SLURM_KINDS else self.strike(kind, launch)

    def wait_due(self, kind: str, launch: Launch, floor: int, ahead: int, alive: Callable[[], bool]) -> bool:
        """Poll until the event is due (True) or the launch ended first (False): `ahead` steps into the launch and
        past the last event's step, or (save-kill) a save past it in progress."""
        deadline, next_check = time.monotonic() + LAUNCH_TIMEOUT_S, 0.0
        while True:
            if time.monotonic() >= next_check:  # under SLURM each look is a process on host0
                if not alive():
                    read_new(self.metrics, launch)
                    return False
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{kind}: no progress within {LAUNCH_TIMEOUT_S:.0f} s (see {launch.log})")
                next_check = time.monotonic() + 0.5
            read_new(self.metrics, launch)
            seen = launch.seen
            if kind == "save-kill":
                saving = staging_step(self.run_dir / "checkpoints")
                if seen and saving is not None and saving > floor:
                    return True
            elif seen and max(seen) >= max(min(seen) - 1 + ahead, floor + 1):
                return True
            time.sleep(POLL_S)

    def strike(self, kind: str, launch: Launch) -> Event:
        """A torchrun event: SIGKILL to a host or a rank, then wait (bounded) for the rest of the job to stop."""
        index = self.rng.randint(0, 1)
        host, rank = self.cluster.hosts[index], None
        if kind == "rank-kill":
            rank = 2 * launch.order.index(index) + self.rng.randint(0, 1)
            os.kill(rank_pid(host.netns, rank), signal.SIGKILL)
        else:
            host.kill()
        killed_at = time.time()
        in_save = staging_step(self.run_dir / "checkpoints") is not None
        while any(p.poll() is None for p in self.procs) and time.time() - killed_at < SURVIVORS_EXIT_S:
            time.sleep(0.1)
        if any(p.poll() is None for p in self.procs):  # a hang: keep where the survivors wait as evidence
            self.dump_stacks(self.workdir / f"{launch.log.stem}.stacks.txt")
        wait_all(self.procs, timeout=30)
        teardown = time.time() - killed_at
        for each in self.cluster.hosts:  # whatever a launcher left behind (workers in sessions of their own)
            each.kill()
        self.procs, self.live = [], None
        self.close(launch)
        others = [h for h in self.cluster.hosts if h is not host] if kind != "rank-kill" else self.cluster.hosts
        texts = [(self.workdir / f"{launch.log.stem}.{h.name}.log").read_text(errors="replace") for h in others]
        lost = next((m for text in texts if (m := E308.search(text))), None)
        stop = f"E308: rank(s) {lost.group(1)} on {lost.group(2)}" if lost else "no E308"
        return self.event(kind, launch, killed_at, teardown, rank=rank, host=host.name, in_save=in_save, stop=stop)

    def dump_stacks(self, path: Path) -> None:
        """The Python stacks of every training process still alive (py-spy, when installed), into `path`."""
        spy = shutil.which("py-spy")
        with path.open("w") as out:
            for host in self.cluster.hosts:
                pids = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True, text=True, timeout=30)
                for pid in pids.stdout.split():
                    with contextlib.suppress(psutil.Error):
                        out.write(f"== {host.name} pid {pid}: {' '.join(psutil.Process(int(pid)).cmdline())[:200]}\n")
                    if spy:
                        done = subprocess.run([spy, "dump", "--pid", pid], capture_output=True, text=True, timeout=60)
                        out.write(done.stdout + done.stderr)
        print(f"warning: the job outlived the kill by {SURVIVORS_EXIT_S:.0f} s; stacks in {path}", flush=True)

    def strike_slurm(self, kind: str, launch: Launch) -> Event:
        """A SLURM event: the stop is sent, every rank saves and exits, SLURM (or the script) requeues the job."""
        assert self.slurm is not None
        command = ["scontrol", "requeue"] if kind == "slurm-requeue" else ["scancel", "--signal=USR1"]
        self.slurm.run(*command, str(self.job))
        killed_at = time.time()
        self.slurm.wait(lambda: self.job_state() == "PENDING", "the requeue", REQUEUE_S)
        teardown = time.time() - killed_at
        end = self.close(launch)
        text = launch.log.read_text(errors="replace")
        reasons = sorted(set(re.findall(r"stop_reason=signal (\w+)", text)))
        codes = sorted(set(re.findall(r"exit(?:ed with exit)? code (\d+)", text, re.IGNORECASE)))
        stop = f"{'/'.join(reasons) or 'no stop_reason'}, exit {'/'.join(codes) or '?'}, requeued"
        event = self.event(kind, launch, killed_at, teardown, rank=None, host=None, in_save=False, stop=stop)
        self.new_launch("slurm", out_offset=end)
        return event

    def event(self, kind: str, launch: Launch, killed_at: float, teardown: float, **what: Any) -> Event:
        read_new(self.metrics, launch)
        step = max((r["step"] for r in launch.records), default=0)
        tags = list_complete_tags(self.run_dir / "checkpoints")
        newest = tag_step(tags[-1]) if tags else 0
        return Event(kind, what["rank"], step, what["in_save"], killed_at, teardown, host=what["host"],
                     stop=what["stop"], newest_tag=newest)  # fmt: skip

    def close(self, launch: Launch) -> int:
        """Write the launch's log (both hosts', or its part of the SLURM job's output); where that part ended."""
        if launch.launcher == "slurm":
            data = self.slurm_out().read_bytes() if self.slurm_out().exists() else b""
            launch.log.write_bytes(data[launch.out_offset :])
            return len(data)
        hosts = [self.cluster.hosts[i].name for i in launch.order]
        launch.log.write_text("".join((self.workdir / f"{launch.log.stem}.{h}.log").read_text(errors="replace")
                                      for h in hosts))  # fmt: skip
        return 0

    def finish(self) -> None:
        """The last launch runs to the end (bounded): the one running, or a torchrun relaunch after the last kill."""
        launch = self.live or self.torchrun_launch()
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        if launch.launcher == "slurm":
            while (state := self.job_state()) not in ENDED and time.monotonic() < deadline:
                read_new(self.metrics, launch)
                time.sleep(0.5)
            self.final_exit = 0 if state == "COMPLETED" else 1
        else:
            while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
                read_new(self.metrics, launch)
                time.sleep(POLL_S * 4)
            self.final_exit = max(abs(code) for code in wait_all(self.procs, timeout=1))
        read_new(self.metrics, launch)
        self.close(launch)


# ---- what each event cost --------------------------------------------------------------------------------------
def data_lost(drill: ClusterDrill, event: Event, launch: Launch) -> float:
    """The launch after `event` against the reference: data positions in the tags it wrote, tokens of its steps."""
    ours, theirs = drill.run_dir / "checkpoints", drill.reference_dir / "checkpoints"
    last = max(launch.seen, default=0)
    tags = set(list_complete_tags(ours)) & set(list_complete_tags(theirs))
    gap = sum(tag_position_gap(ours, theirs, t)[0] for t in tags if (event.resumed_at or 0) < tag_step(t) <= last)
    reference = {r["step"]: r["tokens"] for r in read_records(drill.reference_dir) if "loss" in r}
    return gap + sum(abs(r["tokens"] - reference.get(r["step"], 0)) for r in launch.records)


def relaunch(event: Event, launch: Launch) -> str:
    if launch.launcher == "slurm":
        if event.kind in SLURM_KINDS:
            return "requeued"
        return "sbatch --force-unlock" if launch.force_unlock else "sbatch"
    return "torchrun, ranks swapped" if launch.order != (0, 1) else "torchrun"


def rows(drill: ClusterDrill, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per event (summarize() has filled in where each resumed and what it lost)."""
    out, events, launches = [], cast(list[Event], drill.kills), cast(list[Launch], drill.segments)
    for event, launch, kill in zip(events, launches[1:], summary["per_kill"], strict=True):
        survived = bool(launch.seen) and max(launch.seen) > (event.resumed_at or 0)
        out.append({**kill, "relaunch": relaunch(event, launch), "data_lost": data_lost(drill, event, launch),
                    "survived": survived and event.resumed_at == event.newest_tag,
                    "exact": kill["first_step_off_after_resume"] is None and survived})  # fmt: skip
    return out


def print_table(args: argparse.Namespace, events: list[dict[str, Any]], summary: dict[str, Any], wall: float) -> None:
    print(f"cluster fault drill: {len(events)} events, seed {args.seed}, 2 hosts x 2 ranks (debug, fp32, EP 2, "
          f"ZeRO-2), {args.steps} steps, a save every {args.save_every} steps; {wall:.0f} s")  # fmt: skip
    print("| # | event | target | at step | in a save | job stopped after | how it stopped | resumed at | relaunch "
          "| survived | exact | data lost | time lost |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, e in enumerate(events, 1):
        target = e["host"] or "job"
        target += f" rank {e['rank']}" if e["rank"] is not None else ""
        lost = f"{e['lost_s']:.1f} s" if e["lost_s"] is not None else "n/a"
        in_save = ("yes" if e["in_save"] else "no") if e["kind"] in TORCHRUN_KINDS else "-"
        print(f"| {i} | {e['kind']} | {target} | {e['step']} | {in_save} | {e['teardown_s']:.1f} s | {e['stop']} "
              f"| {e['resumed_at']} | {e['relaunch']} | {'yes' if e['survived'] else 'NO'} "
              f"| {'yes' if e['exact'] else 'NO'} | {e['data_lost']:g} | {lost} |")  # fmt: skip
    n, data = len(events), summary["data"]
    lost_s = [e["lost_s"] for e in events if e["lost_s"] is not None]
    mean = f"{statistics.mean(lost_s):.1f} s mean, {max(lost_s):.1f} s max" if lost_s else "n/a"
    print(f"| total | {n} events | | | | | | | final launch exit {summary['final_exit']} "
          f"| {sum(e['survived'] for e in events)}/{n} | {sum(e['exact'] for e in events)}/{n} "
          f"| {data['position_gap'] + data['token_gap']:g} | {mean} |")  # fmt: skip
    print(f"largest |loss - reference| after a resume: {summary['max_loss_gap']:.2e} (tolerance {TOLERANCE:g}); "
          f"data positions of {data['positions']} rank states in {data['tags']} tags and the tokens of "
          f"{data['steps_logged']}/{data['steps']} steps compared with the reference's")  # fmt: skip


def draw_events(args: argparse.Namespace) -> list[str]:
    """The events in the order they run: torchrun's first, then SLURM's (see the docstring)."""
    if args.events:
        events = args.events.split(",")
        unknown = sorted(set(events) - set(KINDS))
        if unknown:
            raise SystemExit(f"unknown events {unknown}; choose from {', '.join(KINDS)}")
    else:
        rng = random.Random(args.seed)
        events = [rng.choice(KINDS) for _ in range(args.kills)]
    return sorted(events, key=lambda kind: kind in SLURM_KINDS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", help=f"a comma-separated list of events (of {', '.join(KINDS)})")
    p.add_argument("--kills", type=int, default=5, help="without --events: events drawn at random (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="draws the events, hosts, ranks, moments and relaunch orders")
    p.add_argument("--steps", type=int, help="steps of both runs (default: 3 x save-every x (events + 1))")
    p.add_argument("--save-every", type=int, default=2, help="--save-every-n-steps of both runs (default: 2)")
    p.add_argument("--tokenizer", type=Path, help="a trained tokenizer.json for both runs (default: trained by them)")
    p.add_argument("--extra-flags", default="", help="more `lumina-ds train` flags for both runs, after an =")
    p.add_argument("--workdir", type=Path, help="keep the runs and logs here (default: a temporary directory)")
    p.add_argument("--output", type=Path, help="write the summary as JSON here")
    args = p.parse_args(argv)
    args.event_list = draw_events(args)
    args.steps = args.steps or 3 * args.save_every * (len(args.event_list) + 1)
    args.zero_stage, args.backup = 2, False  # what the cluster tests run; fault_drill's options not offered here
    if any(kind in SLURM_KINDS for kind in args.event_list) and slurm_unavailable():
        raise SystemExit(f"SLURM events: {slurm_unavailable()}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if reason := cluster_unavailable():
        raise SystemExit(reason)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cluster-drill-") as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:  # the SLURM daemons, then the hosts, whatever happens
            cluster = stack.enter_context(LocalCluster(2, root=workdir))
            drill = ClusterDrill(args, workdir, cluster, stack)
            drill.run()
        summary = summarize(drill)
        summary["events"] = rows(drill, summary)
    wall = time.monotonic() - started
    print_table(args, summary["events"], summary, wall)
    summary["wall_s"] = wall
    if args.output:
        args.output.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


if __name__ == "__main__":
    main()
