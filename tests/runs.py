"""Running lumina-ds as a user does, at the cost a test can afford.

- `here(argv)`: the command line in this process (`lumina_ds.cli.main`): same parsing, resolution and training as the
  console script, without an interpreter start or imports; one-rank runs share the process group this process holds.
- `ranks(argv, n)`: n ranks of one job, each a process forked from a server that imported torch, DeepSpeed and
  lumina-ds once per session, with the rendezvous variables a launcher sets; like the DeepSpeed launcher, a rank that
  fails brings the others down.
- `subprocess_lumina(argv)`: a fresh interpreter, for what only a process boundary shows (entry points, imports).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lumina_ds.distributed.env import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TRAIN = str(EXAMPLES / "conversations.jsonl")
EVAL = str(EXAMPLES / "conversations_eval.jsonl")
# small and fast: 128-token rows, micro-batch 4, a log line every step
FAST = ["--preset", "debug", "--seq-len", "128", "--micro-batch-size", "4", "--log-every-n-steps", "1"]
# the shared run's schedule (tests/conftest.py): runs that must follow it step for step use the same
SHARED_STEPS = 12
SHARED_RUN = ["--max-steps", str(SHARED_STEPS), "--save-every-n-steps", "2", "--save-total-limit", "20",
              "--eval-every-n-steps", "4"]  # fmt: skip
RANK_TIMEOUT_S = 300
PEER_GRACE_S = 1.0  # after a rank fails, how long the others get before they are stopped (the launcher's behaviour)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training log records, evaluation records) of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)[0]}


# ---- in this process ------------------------------------------------------------------------------------------
def here(argv: list[str], *, cwd: Path, faults: str = "", env: dict[str, str] | None = None) -> Result:
    """`lumina-ds ARGV` in this process, in `cwd`, with LUMINA_FAULTS and `env` set for the call only."""
    from lumina_ds.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.update({"LUMINA_FAULTS": faults, **(env or {})})
    os.chdir(cwd)
    console = logging.StreamHandler(err)  # as Python's last-resort handler prints warnings to a console's stderr
    console.setLevel(logging.WARNING)
    logging.getLogger().addHandler(console)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = _main_code(main, argv)
    finally:
        logging.getLogger().removeHandler(console)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return Result(code, out.getvalue(), err.getvalue())


def _main_code(main: Any, argv: list[str]) -> int:
    try:
        return int(main(argv))
    except SystemExit as exc:  # argparse
        return int(exc.code or 0)
    except Exception:  # what the console script would print before exiting 1
        traceback.print_exc()
        return 1


# ---- ranks forked from a warm server --------------------------------------------------------------------------
_SERVER: Any = None


def _server() -> Any:
    global _SERVER
    if _SERVER is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["tests.rank_preload"])
        _SERVER = context
    return _SERVER


def stop_rank_server() -> None:
    from multiprocessing import forkserver

    forkserver._forkserver._stop()  # type: ignore[attr-defined]


def _rank_main(target: Any, args: tuple[Any, ...], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    """One rank: the environment a launcher gives it, its output in files, then `target(*args)`, which ends the
    process (the console script's `entry` leaves through os._exit; anything else exits 0 once it returns)."""
    os.chdir(cwd)
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    import torch

    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    target(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown, as lumina_ds.distributed.env.exit_process does after a distributed run


def _cli(argv: list[str]) -> None:
    from lumina_ds.cli import entry

    entry(argv)


@dataclass
class RankGroup:
    processes: list[Any]
    logs: list[tuple[Path, Path]]

    def wait(self, timeout: float = RANK_TIMEOUT_S) -> Result:
        """Wait for every rank; when one fails, the others get PEER_GRACE_S, then are stopped."""
        deadline, failed_at = time.monotonic() + timeout, None
        while any(p.is_alive() for p in self.processes) and time.monotonic() < deadline:
            if failed_at is None and any(p.exitcode not in (None, 0) for p in self.processes):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > PEER_GRACE_S:
                break
            time.sleep(0.1)
        self._stop_alive()
        codes = [p.exitcode for p in self.processes]
        code = next((c for c in codes if c not in (0, None, -signal.SIGTERM, -signal.SIGKILL)), None)
        code = code if code is not None else (0 if all(c == 0 for c in codes) else 1)
        stdout = "".join(out.read_text(errors="replace") for out, _ in self.logs)
        stderr = "".join(err.read_text(errors="replace") for _, err in self.logs)
        return Result(code, stdout, stderr)

    def _stop_alive(self) -> None:
        for signum, wait_s in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            alive = [p for p in self.processes if p.is_alive()]
            for p in alive:
                os.kill(p.pid, signum)
            for p in alive:
                p.join(wait_s)


def start_ranks(
    argv: list[str], *, cwd: Path, n: int = 2, faults: str = "", env: dict[str, str] | None = None
) -> RankGroup:
    """n ranks of `lumina-ds ARGV` on one host (rank i is local rank i), started and not waited for."""
    return start_calls(_cli, (argv,), cwd=cwd, n=n, env={"LUMINA_FAULTS": faults, **(env or {})})


def start_calls(
    target: Any, args: tuple[Any, ...], *, cwd: Path, n: int = 2, env: dict[str, str] | None = None
) -> RankGroup:
    """n ranks each calling `target(*args)` (a module-level function, imported by name in the rank)."""
    server, port = _server(), free_port()
    logs, processes = [], []
    for rank in range(n):
        rank_env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(max(1, 2 // n)),
                    "PYTHONUNBUFFERED": "1", **(env or {})}  # fmt: skip
        out, err = cwd / f".rank{rank}.out", cwd / f".rank{rank}.err"
        process = server.Process(target=_rank_main, args=(target, args, rank_env, str(cwd), str(out), str(err)))
        process.start()
        processes.append(process)
        logs.append((out, err))
    return RankGroup(processes, logs)


def ranks(argv: list[str], *, cwd: Path, n: int = 2, faults: str = "", env: dict[str, str] | None = None) -> Result:
    """n ranks of `lumina-ds ARGV`, run to the end (see start_ranks)."""
    return start_ranks(argv, cwd=cwd, n=n, faults=faults, env=env).wait()


def call_on_ranks(target: Any, *args: Any, cwd: Path, n: int = 2, env: dict[str, str] | None = None) -> Result:
    """n ranks each running `target(*args)` to the end (see start_calls)."""
    return start_calls(target, args, cwd=cwd, n=n, env=env).wait()


# ---- a fresh interpreter --------------------------------------------------------------------------------------
def child_env(ranks: int = 1) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, 2 // ranks)), PYTHONUNBUFFERED="1")
    return env


def run(cmd: list[str], *, cwd: Path, ranks: int = 1, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=child_env(ranks), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n---stderr---\n")
    return proc


def subprocess_lumina(args: list[str], *, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "lumina_ds", *args], cwd=cwd)


def deepspeed_launch(args: list[str], *, cwd: Path, ranks: int = 2) -> subprocess.CompletedProcess[str]:
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks)]
    launcher += ["--master_port", str(free_port()), str(ROOT / "launch" / "train.py")]
    return run(launcher + args, cwd=cwd, ranks=ranks)
