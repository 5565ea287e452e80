"""SLURM between two namespace hosts: `sbatch launch/slurm/train.sbatch` as a user submits it (2 nodes x 2 tasks,
plain srun), stopped two ways, then resumed with the losses of an uninterrupted run:
- the warning SLURM sends before a time limit (`scancel --signal=USR1`, what `--signal=USR1@LEAD` does): every rank
  saves and exits 138, and the script requeues the job;
- pre-emption (`scontrol requeue`): SLURM sends SIGTERM to the job and requeues it; every rank saves and exits 143
  within the KillWait grace."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.cluster.harness import LocalCluster
from tests.cluster.slurm import Slurm, slurm_unavailable
from tests.cluster.test_two_hosts import on_one_host, train_argv
from tests.runs import FAST, ROOT, TRAIN, child_env, losses

pytestmark = pytest.mark.skipif(slurm_unavailable() is not None, reason=str(slurm_unavailable()))

STEPS = 100
STOPS = {  # how the first launch is stopped: the command, and what its output then says
    "time-limit-warning": (["scancel", "--signal=USR1"], ["stop_reason=signal SIGUSR1", "requeueing job"]),
    "scontrol-requeue": (["scontrol", "requeue"], ["stop_reason=signal SIGTERM"]),
}


@pytest.mark.parametrize("stop", list(STOPS))
def test_a_stopped_slurm_job_checkpoints_is_requeued_and_resumes_exactly(
    tmp_path: Path, shared_run: Path, stop: str
) -> None:
    tokenizer = shared_run / "tokenizer.json"
    flags = [*FAST, "--train-data", TRAIN, "--tokenizer", str(tokenizer), "--precision", "fp32", "--zero-stage", "2",
             "--expert-parallel-size", "2", "--max-steps", str(STEPS), "--save-every-n-steps", "4",
             "--no-progress-bar", "--output-dir", str(tmp_path / "runs")]  # fmt: skip
    env = {**child_env(2), "LUMINA_LAUNCHER": "srun", "GPUS_PER_NODE": "2",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # fmt: skip
    run_dir = tmp_path / "runs" / "slurm"
    with LocalCluster(2, root=tmp_path) as cluster:
        slurm = Slurm(cluster, tmp_path).start()
        try:
            job = slurm.sbatch(["--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
                                "--open-mode=append", f"--output={tmp_path}/slurm-%j.out",
                                str(ROOT / "launch" / "slurm" / "train.sbatch"), *flags, "--experiment-name",
                                "slurm"], env=env, cwd=ROOT)  # fmt: skip
            tag = run_dir / "checkpoints" / "step_00000008" / "complete.json"
            slurm.wait(tag.exists, "the first checkpoints", 240)
            command, expected_lines = STOPS[stop]
            slurm.run(*command, str(job))
            requeued = lambda: "JobState=PENDING" in slurm.run("scontrol", "show", "job", str(job))  # noqa: E731
            slurm.wait(requeued, "the requeue", 120)
            done = lambda: max(losses(run_dir), default=0) == STEPS  # noqa: E731
            slurm.wait(done, "the requeued job's last step", 300)
            slurm.wait(lambda: "COMPLETED" in slurm.run("scontrol", "show", "job", str(job)), "the job's end", 60)
            out = (tmp_path / f"slurm-{job}.out").read_text()
        finally:
            slurm.stop()
    assert all(line in out for line in expected_lines), out[-4000:]
    assert out.count("lumina-ds: 2 node(s) x 2 GPUs") == 2  # the script ran twice: once, then requeued
    on_one_host(tmp_path, train_argv(tokenizer, "uninterrupted", ["--zero-stage", "2", "--expert-parallel-size", "2",
                                                                  "--max-steps", str(STEPS)]))  # fmt: skip
    got, expected = losses(run_dir), losses(tmp_path / "runs" / "uninterrupted")
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(abs(got[s] - expected[s]) <= 1e-5 for s in got)
