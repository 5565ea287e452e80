"""One run per run directory: the run lock (lumina_ds/run_dir.py) is created with its content in one step, is a lease
its holder renews, is taken over when stale (unreadable, its process gone, this process's own pid, an expired
heartbeat) without racing another starter, and is broken by --force-unlock."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lumina_ds import run_dir
from lumina_ds.cli import build_parser
from lumina_ds.errors import CheckpointError
from lumina_ds.run_dir import LOCK_FILE, LOCK_LEASE_S, RunLock
from tests.runs import FAST, TRAIN, here

WAIT_S = 10.0  # the most a test waits for the heartbeat thread


def write_lock(directory: Path, **holder: object) -> dict[str, object]:
    """A lock as another run would have left it: this host, a fresh heartbeat, unless `holder` says otherwise."""
    content = {"host": socket.gethostname(), "pid": os.getppid(), "token": "theirs", "heartbeat": time.time()}
    content.update(holder)
    (directory / LOCK_FILE).write_text(json.dumps(content))
    return content


def lock_content(directory: Path) -> dict[str, object]:
    return dict(json.loads((directory / LOCK_FILE).read_text()))


def wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}"
        time.sleep(0.01)


@pytest.fixture
def lock(tmp_path: Path) -> Iterator[RunLock]:
    """A lock on tmp_path, released (heartbeat thread stopped) whatever the test does."""
    taken = RunLock(tmp_path)
    yield taken
    taken.release()


def test_one_run_per_run_directory(tmp_path: Path, lock: RunLock) -> None:
    assert lock.acquire() is None and lock.held
    with pytest.raises(CheckpointError) as err:
        RunLock(tmp_path).acquire()  # this process holds it: not stale although it names this pid
    assert err.value.code == "E305" and f"pid {os.getpid()}" in err.value.message
    assert "--force-unlock" in err.value.hint and f"{LOCK_LEASE_S:.0f} s" in err.value.hint
    lock.release()
    again = RunLock(tmp_path)
    assert again.acquire() is None
    again.release()


def test_the_released_lock_is_gone_and_its_heartbeat_stopped(tmp_path: Path, lock: RunLock) -> None:
    lock.acquire()
    beats = lock._beats
    assert beats is not None and beats.is_alive() and beats.daemon
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists() and not lock.held and not beats.is_alive()
    assert os.listdir(tmp_path) == []


def test_a_failing_write_leaves_no_lock_and_the_next_start_takes_it(
    tmp_path: Path, lock: RunLock, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(path: Path, data: bytes) -> None:
        path.write_bytes(b"")  # the file exists, its content does not fit
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_dir, "_write_bytes", full_disk)
    with pytest.raises(CheckpointError) as err:
        lock.acquire()
    assert err.value.code == "E304" and "No space left" in err.value.message
    assert os.listdir(tmp_path) == []  # neither an empty lock nor a temp file
    monkeypatch.undo()
    assert lock.acquire() is None and lock_content(tmp_path)["pid"] == os.getpid()


def test_a_failing_heartbeat_leaves_the_lock_whole(
    tmp_path: Path, lock: RunLock, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock.acquire()
    before = (tmp_path / LOCK_FILE).read_bytes()

    def full_disk(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_dir, "_write_bytes", full_disk)
    assert lock._beat()  # skipped, still ours
    assert (tmp_path / LOCK_FILE).read_bytes() == before and os.listdir(tmp_path) == [LOCK_FILE]


def test_an_empty_lock_is_taken_over_with_a_warning(tmp_path: Path, lock: RunLock) -> None:
    (tmp_path / LOCK_FILE).write_text("")
    warning = lock.acquire()
    assert warning is not None and "unreadable" in warning and lock.held
    assert lock_content(tmp_path)["pid"] == os.getpid()


@pytest.mark.parametrize("token", ["an-earlier-incarnation", None], ids=["with token", "older lock format"])
def test_a_lock_naming_this_process_is_taken_over(tmp_path: Path, lock: RunLock, token: str | None) -> None:
    """A container restarted with the same hostname and pid finds its own pid in the lock it left."""
    holder = write_lock(tmp_path, pid=os.getpid(), token=token)
    warning = lock.acquire()
    assert warning is not None and f"pid {os.getpid()}" in warning and "this process" in warning
    assert lock_content(tmp_path)["token"] != holder["token"]


def test_a_lock_of_a_gone_process_is_taken_over(tmp_path: Path, lock: RunLock) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_lock(tmp_path, pid=int(gone.stdout))
    warning = lock.acquire()
    assert warning is not None and f"pid {int(gone.stdout)}" in warning and "gone" in warning and lock.held


def test_a_live_process_with_a_fresh_heartbeat_holds_the_lock(tmp_path: Path) -> None:
    holder = write_lock(tmp_path)  # our parent process: alive, but no lumina-ds run
    with pytest.raises(CheckpointError) as err:
        RunLock(tmp_path).acquire()
    assert err.value.code == "E305" and f"pid {holder['pid']} on {holder['host']}" in err.value.message
    assert "--force-unlock" in err.value.hint and f"expires {LOCK_LEASE_S:.0f} s after" in err.value.hint
    write_lock(tmp_path, host="another-node", pid=1)  # its process cannot be checked: the lease decides
    with pytest.raises(CheckpointError, match="in use by another run"):
        RunLock(tmp_path).acquire()
    assert lock_content(tmp_path)["host"] == "another-node"  # untouched


@pytest.mark.parametrize("host", ["this host", "another-node"])
def test_a_lock_whose_heartbeat_is_older_than_the_lease_is_taken_over(tmp_path: Path, lock: RunLock, host: str) -> None:
    old = time.time() - LOCK_LEASE_S - 1
    holder = write_lock(tmp_path, heartbeat=old, **({} if host == "this host" else {"host": host}))
    warning = lock.acquire()
    assert warning is not None and f"pid {holder['pid']} on {holder['host']}" in warning
    assert f"heartbeat {LOCK_LEASE_S + 1:.0f} s old" in warning and "lease" in warning
    assert lock_content(tmp_path)["pid"] == os.getpid()


@pytest.mark.parametrize(
    ("variable", "value", "job"),
    [("SLURM_JOB_ID", "4711", "slurm job 4711"), ("TORCHELASTIC_RUN_ID", "j42", "run id j42")],
)
def test_a_lock_an_earlier_launch_of_this_job_left_on_another_host_is_taken_over(
    tmp_path: Path, lock: RunLock, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, job: str
) -> None:
    """A requeued SLURM job (same job id) or a relaunch with the same run id whose rank 0 lands on another node: the
    lock its killed predecessor left has a fresh heartbeat and a process this host cannot check."""
    for name in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "LUMINA_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, value)
    write_lock(tmp_path, host="another-node", pid=1, job=job)
    warning = lock.acquire()
    assert warning is not None and f"pid 1 on another-node, {job}" in warning
    assert f"left by an earlier launch of this job ({job})" in warning
    assert lock_content(tmp_path)["job"] == job and lock_content(tmp_path)["pid"] == os.getpid()


def test_a_lock_of_another_job_or_of_no_job_is_not_taken_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "LUMINA_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    write_lock(tmp_path, host="another-node", pid=1, job="slurm job 4700")  # another job: its lease decides
    with pytest.raises(CheckpointError, match=r"in use by another run \(pid 1 on another-node, slurm job 4700"):
        RunLock(tmp_path).acquire()
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default run id names no job
    write_lock(tmp_path, host="another-node", pid=1, job=None)
    with pytest.raises(CheckpointError, match="in use by another run"):
        RunLock(tmp_path).acquire()


def test_a_lock_renewed_while_judged_stale_is_put_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between our read (an old heartbeat) and our rename, its holder beat: the lock is put back, and E305."""
    fresh = write_lock(tmp_path)
    judged = json.dumps({**fresh, "heartbeat": time.time() - LOCK_LEASE_S - 1}).encode()
    monkeypatch.setattr(RunLock, "_read", lambda self: judged)
    with pytest.raises(CheckpointError) as err:
        RunLock(tmp_path).acquire()
    assert err.value.code == "E305" and "changed meanwhile" in err.value.message
    assert lock_content(tmp_path) == fresh and os.listdir(tmp_path) == [LOCK_FILE]


def test_the_heartbeat_renews_the_lease(tmp_path: Path, lock: RunLock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_dir, "LOCK_HEARTBEAT_S", 0.05)
    lock.acquire()
    first = float(lock_content(tmp_path)["heartbeat"])  # type: ignore[arg-type]
    wait_for(lambda: float(lock_content(tmp_path)["heartbeat"]) > first, "a newer heartbeat")  # type: ignore[arg-type]
    assert lock_content(tmp_path)["started"] <= first  # type: ignore[operator]


def test_force_unlock_breaks_a_live_lock_and_its_holder_lets_go(
    tmp_path: Path, lock: RunLock, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(run_dir, "LOCK_HEARTBEAT_S", 1.0)  # its first beat comes after the lock is broken
    lock.acquire()
    breaker = RunLock(tmp_path)
    warning = breaker.acquire(force=True)
    assert warning is not None and warning.startswith(f"--force-unlock: broke the run lock of pid {os.getpid()} on")
    assert "heartbeat 0 s old" in warning
    wait_for(lambda: lock._beats is not None and not lock._beats.is_alive(), "the broken holder's heartbeat stops")
    assert "this run no longer holds it" in capsys.readouterr().err
    lock.release()  # the broken holder leaves the new one's lock alone
    assert lock_content(tmp_path)["token"] == breaker._holder["token"]
    breaker.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_without_hard_links_the_lock_is_created_whole(
    tmp_path: Path, lock: RunLock, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(source: object, target: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    assert lock.acquire() is None and lock_content(tmp_path)["pid"] == os.getpid()
    with pytest.raises(CheckpointError, match="in use by another run"):
        RunLock(tmp_path).acquire()
    assert os.listdir(tmp_path) == [LOCK_FILE]


def test_the_flag_help_states_the_lease(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"{LOCK_LEASE_S / 60:.0f}-minute lease" in help_text.split("--force-unlock", 1)[1]


def test_force_unlock_on_the_command_line(tmp_path: Path) -> None:
    """A live process's lock with a fresh heartbeat stops `train` with E305; --force-unlock breaks it and trains."""
    run = tmp_path / "runs" / "locked"
    run.mkdir(parents=True)
    holder = write_lock(run)
    argv = ["train", *FAST, "--train-data", TRAIN, "--max-steps", "2", "--experiment-name", "locked"]
    refused = here(argv, cwd=tmp_path)
    assert refused.returncode == 1 and "[E305]" in refused.stderr and "--force-unlock" in refused.stderr
    forced = here([*argv, "--force-unlock"], cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert f"warning: --force-unlock: broke the run lock of pid {holder['pid']} on {holder['host']}" in forced.stdout
    assert not (run / LOCK_FILE).exists()
