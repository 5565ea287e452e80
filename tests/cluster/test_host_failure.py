"""A host dies mid-run (SIGKILL to every process in its namespace, as a node failure leaves them): the other host's
ranks stop within 60 s with E308 naming the lost ranks and host; the same job relaunched with the node ranks swapped
(rank 0 now on the other host) takes over the lock the dead rank 0 left, resumes from the last complete checkpoint
and trains the same losses as an uninterrupted run."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lumina_ds.distributed.env import free_port
from tests.cluster.harness import LocalCluster, wait_all
from tests.cluster.test_two_hosts import RUN_TIMEOUT_S, on_one_host, torchrun, train_argv
from tests.runs import child_env, losses

STEPS = 200
JOB = "job-b"
SURVIVORS_EXIT_S = 60.0


def launch(cluster: LocalCluster, argv: list[str], *, root: Path, order: list[int], attempt: int) -> list:
    """torchrun on every host, node rank i on host order[i], rank 0's host the master."""
    master, port = cluster.hosts[order[0]].address, free_port()
    procs = []
    for node_rank, index in enumerate(order):
        host = cluster.hosts[index]
        procs.append(host.start([*torchrun(nodes=2, node_rank=node_rank, master=master, port=port, run_id=JOB), *argv],
                                env=child_env(2), log=root / f"{host.name}.{attempt}.log", cwd=root))  # fmt: skip
    return procs


def wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.05)


def test_a_killed_host_stops_the_job_and_the_relaunch_with_ranks_swapped_resumes_exactly(
    tmp_path: Path, shared_run: Path
) -> None:
    tokenizer = shared_run / "tokenizer.json"
    layout = ["--zero-stage", "2", "--expert-parallel-size", "2", "--max-steps", str(STEPS),
              "--save-every-n-steps", "4"]  # fmt: skip
    run_dir = tmp_path / "runs" / "job"
    with LocalCluster(2, root=tmp_path) as cluster:
        procs = launch(cluster, train_argv(tokenizer, "job", layout), root=tmp_path, order=[0, 1], attempt=1)
        wait_for(run_dir / "checkpoints" / "step_00000008" / "complete.json", RUN_TIMEOUT_S)
        killed = time.monotonic()
        cluster.hosts[0].kill()  # rank 0 and 1, and host0's torchrun
        assert wait_all(procs[1:], timeout=SURVIVORS_EXIT_S + 30) != [0]
        assert time.monotonic() - killed <= SURVIVORS_EXIT_S
        survivor = (tmp_path / "host1.1.log").read_text()
        assert "[E308]" in survivor and "lost contact with rank(s) 0, 1 on host0" in survivor, survivor[-3000:]
        left = json.loads((run_dir / ".run.lock").read_text())  # SIGKILL: no finally ran on host0
        assert (left["host"], left["job"]) == ("host0", f"run id {JOB}")
        stopped_at = max(losses(run_dir))
        assert stopped_at < STEPS
        procs = launch(cluster, train_argv(tokenizer, "job", layout), root=tmp_path, order=[1, 0], attempt=2)
        codes = wait_all(procs, timeout=RUN_TIMEOUT_S)
    relaunch = (tmp_path / "host1.2.log").read_text()
    assert codes == [0, 0], relaunch[-3000:]
    assert f"left by an earlier launch of this job (run id {JOB})" in relaunch
    on_one_host(tmp_path, train_argv(tokenizer, "uninterrupted", layout))
    got, expected = losses(run_dir), losses(tmp_path / "runs" / "uninterrupted")
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(abs(got[s] - expected[s]) <= 1e-5 for s in got), [(s, got[s], expected[s]) for s in got
                                                                 if abs(got[s] - expected[s]) > 1e-5][:5]  # fmt: skip
