"""launch/train.py under every launcher: deepspeed --hostfile (openmpi), mpirun, torchrun; templates; rank variables."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed

from lumina_ds.distributed import env, launchers
from lumina_ds.distributed.env import free_port
from lumina_ds.errors import ConfigError
from tests.runs import EVAL, FAST, ROOT, TRAIN, read_metrics, run

TRAIN_PY = str(ROOT / "launch" / "train.py")
RUN_FLAGS = [*FAST, "--train-data", TRAIN, "--eval-data", EVAL, "--max-steps", "3", "--eval-every-n-steps", "3"]
MPI_ROOT_FLAGS = ["--allow-run-as-root", "--oversubscribe"]


def require_mpi() -> None:
    """CI installs Open MPI (`make system-deps`): a missing mpirun is a broken setup, not a reason to skip."""
    if shutil.which("mpirun") and shutil.which("ompi_info"):
        return
    if os.environ.get("LUMINA_ALLOW_NO_MPI") == "1":
        pytest.skip("Open MPI not installed and LUMINA_ALLOW_NO_MPI=1")
    pytest.fail("mpirun/ompi_info not found: run `make system-deps` (Open MPI), or set LUMINA_ALLOW_NO_MPI=1 to skip")


def check_two_rank_run(workdir: Path, name: str, proc: subprocess.CompletedProcess[str]) -> None:
    """Both ranks trained the same steps together and wrote their part of the checkpoint."""
    assert proc.returncode == 0
    assert "2 process(es) on cpu" in proc.stdout
    run_dir = workdir / "runs" / name
    logs, evals = read_metrics(run_dir)
    assert [r["step"] for r in logs] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in logs) and math.isfinite(evals[-1]["eval_loss"])
    # every token of both ranks' micro-batches (4 rows x 128), routed to the top-2 experts of each MoE layer
    assert all(sum(layer) == 2 * 4 * 128 * 2 for layer in logs[0]["expert_counts"])
    tag = run_dir / "checkpoints" / "step_00000003"
    assert json.loads((tag / "complete.json").read_text())["world_size"] == 2
    assert (tag / "lumina_state" / "rank00000.json").exists() and (tag / "lumina_state" / "rank00001.json").exists()
    assert (tag / "model.safetensors").exists()


@pytest.mark.slow
def test_deepspeed_hostfile_openmpi_launcher(workdir: Path) -> None:
    """The multi-node path on one host: DeepSpeed's runner builds an `mpirun -hostfile` command (no ssh)."""
    require_mpi()
    hostfile = workdir / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    # the runner adds `--mca btl_tcp_if_include eth0` unless an interface is named: CI hosts may lack eth0
    mpi_args = " ".join([*MPI_ROOT_FLAGS, "--mca", "btl_tcp_if_include", "lo", "-x", "OMP_NUM_THREADS=1"])
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--force_multi"]
    cmd += ["--no_ssh_check", "--master_addr", "127.0.0.1", "--launcher", "openmpi", "--launcher_args", mpi_args]
    proc = run([*cmd, TRAIN_PY, *RUN_FLAGS, "--experiment-name", "dsmpi", "--output-dir", "runs"], cwd=workdir, ranks=2)
    check_two_rank_run(workdir, "dsmpi", proc)


@pytest.mark.slow
def test_plain_mpirun_through_the_example_script(workdir: Path) -> None:
    """`launch/mpirun_example.sh` = mpirun -np 2 ... python launch/train.py; ranks meet through mpi4py discovery."""
    require_mpi()
    script = str(ROOT / "launch" / "mpirun_example.sh")
    output = str(workdir / "runs")
    env_vars = {**os.environ, "NP": "2", "PYTHON": sys.executable, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env_vars.pop(name, None)
    cmd = ["bash", script, *RUN_FLAGS, "--experiment-name", "mpi", "--output-dir", output]
    proc = subprocess.run(cmd, cwd=workdir, env=env_vars, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n---stderr---\n")
    check_two_rank_run(workdir, "mpi", proc)


@pytest.mark.slow
def test_torchrun(workdir: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = run([*cmd, TRAIN_PY, *RUN_FLAGS, "--experiment-name", "trun", "--output-dir", "runs"], cwd=workdir, ranks=2)
    check_two_rank_run(workdir, "trun", proc)


# --- rank variables of each launcher, translated for torch's env:// rendezvous (no processes started) ---

RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
OMPI = (*launchers.OPEN_MPI, *launchers.OPEN_MPI_LOCAL[0])  # rank, size, local rank, local size
HYDRA = (*launchers.PMI, *launchers.PMI_LOCAL[0])
CRAY = (*launchers.PMI, *launchers.PMI_LOCAL[1])
LAUNCHER_VARIABLES = [
    *OMPI,
    *HYDRA,
    *CRAY,
    "SLURM_PROCID",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_STEP_NUM_NODES",
    "SLURM_LOCALID",
    "SLURM_JOB_ID",
    "SLURM_STEP_TASKS_PER_NODE",
    "LOCAL_SIZE",
    "LOCAL_WORLD_SIZE",
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No launcher variables; whatever ensure_rendezvous_env sets is undone after the test (monkeypatch alone only
    undoes its own changes, and the variables it deleted would stay set by the code under test)."""
    saved = dict(os.environ)
    for name in (*RENDEZVOUS, *LAUNCHER_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def rendezvous_env() -> dict[str, str]:
    env.ensure_rendezvous_env()
    return {name: os.environ[name] for name in RENDEZVOUS if name in os.environ}


def fake_mpi4py(monkeypatch: pytest.MonkeyPatch, broadcast: dict[str, object]) -> list[object]:
    """mpi4py whose bcast returns what rank 0 would send (`broadcast` by type); records what this rank offered."""
    offered: list[object] = []

    class Comm:
        def bcast(self, value: object, root: int) -> object:
            assert root == 0
            offered.append(value)
            return broadcast[type(value).__name__] if value is not None else broadcast["NoneType"]

    mpi = type(sys)("mpi4py.MPI")
    mpi.COMM_WORLD = Comm()  # type: ignore[attr-defined]
    package = type(sys)("mpi4py")
    package.MPI = mpi  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mpi4py", package)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", mpi)
    return offered


def test_mpirun_with_master_variables_needs_no_mpi4py(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setitem(sys.modules, "mpi4py", None)  # importing it would fail
    for name, value in zip(OMPI, ("11", "16", "3", "8"), strict=True):
        clean_env.setenv(name, value)
    clean_env.setenv("MASTER_ADDR", "10.0.0.1")
    clean_env.setenv("MASTER_PORT", "31234")
    assert rendezvous_env() == {
        "RANK": "11",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "3",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "31234",
    }


def test_mpirun_rank0_shares_loopback_and_a_free_port_on_one_host(clean_env: pytest.MonkeyPatch) -> None:
    offered = fake_mpi4py(clean_env, {"str": "127.0.0.1", "int": 40001})
    for name, value in zip(OMPI, ("0", "2", "0", "2"), strict=True):
        clean_env.setenv(name, value)
    got = rendezvous_env()
    assert offered[0] == "127.0.0.1" and isinstance(offered[1], int) and 0 < offered[1] < 65536
    assert got == {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "40001",
    }


def test_mpirun_other_ranks_take_rank0s_address_and_keep_a_given_port(clean_env: pytest.MonkeyPatch) -> None:
    """Hydra (MPICH / Intel MPI) variables; rank 5 of 16 on the second node offers nothing of its own."""
    offered = fake_mpi4py(clean_env, {"NoneType": "10.0.0.7"})
    for name, value in zip(HYDRA, ("5", "16", "5", "8"), strict=True):
        clean_env.setenv(name, value)
    clean_env.setenv("MASTER_PORT", "29600")  # -x MASTER_PORT=29600
    got = rendezvous_env()
    assert offered == [None]  # only the address was asked for
    assert got == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29600"}  # fmt: skip


def test_mpirun_without_mpi4py_or_master_variables_is_e003(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setitem(sys.modules, "mpi4py", None)
    for name, value in zip(OMPI, ("0", "2", "0", "2"), strict=True):  # Open MPI always sets all four
        clean_env.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        env.ensure_rendezvous_env()
    assert err.value.code == "E003" and "-x MASTER_ADDR" in err.value.hint


PMI2_TASK = {"PMI_RANK": "9", "PMI_SIZE": "16", "SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "16",
             "SLURM_STEP_NUM_NODES": "2", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
             "MASTER_ADDR": "gpu-01", "MASTER_PORT": "29500"}  # fmt: skip


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        # srun --mpi=pmi2 (and Cray PMI) set PMI_RANK/PMI_SIZE in every task: SLURM's own ranks must win
        (PMI2_TASK, ("slurm", 9, 16, 1, 8)),
        # Hydra (MPICH, Intel MPI)
        (dict(zip(HYDRA, ("9", "16", "1", "8"), strict=True)), ("pmi", 9, 16, 1, 8)),
        # Cray PMI names the local rank PMI_LOCAL_RANK
        (dict(zip(CRAY, ("9", "16", "1", "8"), strict=True)), ("pmi", 9, 16, 1, 8)),
        # torchrun/deepspeed without LOCAL_RANK but on one node: the global rank is the local one
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}, ("env", 3, 4, 3, 4)),
        # RANK/WORLD_SIZE exported by a script inside srun: SLURM_LOCALID says which GPU
        ({"RANK": "9", "WORLD_SIZE": "16", "SLURM_LOCALID": "1"}, ("env", 9, 16, 1, 16)),
        ({}, ("none", 0, 1, 0, 1)),
    ],
)
def test_launcher_matrix_resolves_local_ranks(variables: dict[str, str], expected: tuple[object, ...]) -> None:
    launch = launchers.detect_launch(variables)
    got = (launch.launcher, launch.rank, launch.world_size, launch.local_rank, launch.local_world_size)
    assert got == expected


@pytest.mark.parametrize(
    "variables",
    [
        {"PMI_RANK": "9", "PMI_SIZE": "16"},  # a PMI without any local-rank variable
        {"RANK": "9", "WORLD_SIZE": "16"},  # ranks that may span nodes, no LOCAL_RANK
        {"SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_NUM_NODES": "2"},
    ],
)
def test_a_global_rank_never_becomes_a_local_rank_across_nodes(variables: dict[str, str]) -> None:
    """Rank 9 of 16 on two nodes used to ask for cuda:9 on a node of 8 GPUs."""
    with pytest.raises(ConfigError) as err:
        launchers.detect_launch(variables)
    assert err.value.code == "E003" and "no local rank" in err.value.message and "LOCAL_RANK" in err.value.hint


def test_pmi2_srun_task_gets_slurm_rendezvous(clean_env: pytest.MonkeyPatch) -> None:
    for name, value in PMI2_TASK.items():
        clean_env.setenv(name, value)
    assert rendezvous_env() == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                                "MASTER_ADDR": "gpu-01", "MASTER_PORT": "29500"}  # fmt: skip


def test_srun_tasks(clean_env: pytest.MonkeyPatch) -> None:
    slurm = {"SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_NUM_NODES": "2", "SLURM_LOCALID": "1"}
    for name, value in {**slurm, "SLURM_JOB_ID": "123456", "MASTER_ADDR": "gpu-01"}.items():
        clean_env.setenv(name, value)
    # the port every task derives from the job id, as launch/slurm/train.sbatch does: 20000 + 123456 % 20000
    assert rendezvous_env() == {
        "RANK": "9",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu-01",
        "MASTER_PORT": "23456",
    }
    for name in RENDEZVOUS:
        clean_env.delenv(name)
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set"):
        env.ensure_rendezvous_env()


def test_torchrun_variables_win_and_a_lone_process_is_rank0_of_1(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OMPI_COMM_WORLD_RANK", "1")  # torchrun started inside an mpirun job: torchrun's ranks count
    clean_env.setenv("OMPI_COMM_WORLD_SIZE", "2")
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    for name, value in torchrun.items():
        clean_env.setenv(name, value)
    assert rendezvous_env() == torchrun
    for name in (*RENDEZVOUS, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        clean_env.delenv(name, raising=False)
    alone = rendezvous_env()
    assert 0 < int(alone.pop("MASTER_PORT")) < 65536  # a free one
    assert alone == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}


def test_cpu_threads_are_shared_by_the_ranks_on_this_host(clean_env: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    clean_env.setattr(env, "cuda_available", lambda: False)
    clean_env.setattr(env.os, "cpu_count", lambda: 16)
    clean_env.setattr(env.torch, "set_num_threads", calls.append)
    clean_env.delenv("OMP_NUM_THREADS", raising=False)
    clean_env.setenv("WORLD_SIZE", "32")  # 4 nodes x 8 ranks: 2 threads each, not 16 // 32
    clean_env.setenv("LOCAL_WORLD_SIZE", "8")
    env.limit_cpu_threads()
    clean_env.delenv("LOCAL_WORLD_SIZE")
    clean_env.setenv("LOCAL_SIZE", "4")  # deepspeed's launcher
    env.limit_cpu_threads()
    clean_env.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
    env.limit_cpu_threads()
    assert calls == [2, 4]


def test_exit_finalizes_mpi(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank that leaves without MPI_Finalize makes mpirun report the whole job as failed."""
    finalized: list[bool] = []
    mpi = type(sys)("mpi4py.MPI")
    mpi.Is_initialized = lambda: True  # type: ignore[attr-defined]
    mpi.Is_finalized = lambda: bool(finalized)  # type: ignore[attr-defined]
    mpi.Finalize = lambda: finalized.append(True)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", mpi)
    # a process without a process group (this test process may hold the one-rank group other tests started)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    with pytest.raises(SystemExit) as exited:
        env.exit_process(0)  # a plain exit
    assert exited.value.code == 0 and finalized == [True]


# --- templates: the pdsh and slurm launchers cannot run here (no ssh peers, no srun); their inputs are checked ---

SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
MPIRUN_EXAMPLE = ROOT / "launch" / "mpirun_example.sh"


def fake_command(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
    (bin_dir / name).chmod(0o755)


def recording_command(bin_dir: Path, name: str) -> None:
    """`name` writes its arguments, one a line, then MASTER_ADDR and MASTER_PORT, to calls/<name> beside bin/."""
    record = bin_dir.parent / "calls" / name
    fake_command(bin_dir, name, f'printf "%s\\n" "$@" "MASTER=$MASTER_ADDR:$MASTER_PORT" > {record}')


def run_script(script: Path, args: list[str], *, cwd: Path, extra_env: dict[str, str]) -> list[str]:
    """Run a launch script with fakes first on PATH; return what the faked launcher was called with."""
    (cwd / "calls").mkdir(exist_ok=True)
    variables = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "HOSTFILE")}
    variables.update(extra_env, PATH=f"{cwd / 'bin'}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(script), *args], cwd=cwd, env=variables, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (call,) = list((cwd / "calls").iterdir())
    return call.read_text().splitlines()


def test_hostfile_example_parses_with_deepspeeds_parser() -> None:
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(str(ROOT / "launch" / "hostfile.example"))
    assert dict(pool) == {f"node-00{i}": 8 for i in range(1, 5)}


@pytest.fixture
def slurm_job(workdir: Path) -> dict[str, str]:
    """A 2-node allocation as scontrol expands it: the sbatch script's environment."""
    fake_command(
        workdir / "bin", "scontrol", '[[ "$*" == "show hostnames gpu-[07-08]" ]] && printf "gpu-07\\ngpu-08\\n"'
    )
    return {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-[07-08]"}


def test_sbatch_writes_the_hostfile_and_runs_the_deepspeed_slurm_launcher(workdir: Path, slurm_job: dict[str, str]):
    from deepspeed.launcher.runner import fetch_hostfile

    recording_command(workdir / "bin", "deepspeed")
    call = run_script(SBATCH, ["--preset", "b300", "--train-data", "d.jsonl"], cwd=workdir, extra_env=slurm_job)
    hostfile = "runs/hostfile.4242"
    assert (workdir / hostfile).read_text() == "gpu-07 slots=8\ngpu-08 slots=8\n"
    assert dict(fetch_hostfile(str(workdir / hostfile))) == {"gpu-07": 8, "gpu-08": 8}
    port = str(20000 + 4242)  # the same on every rank, different per job
    assert call == ["--hostfile", hostfile, "--launcher", "slurm", "--no_ssh_check", "--master_addr", "gpu-07",
                    "--master_port", port, "launch/train.py", "--preset", "b300", "--train-data", "d.jsonl",
                    f"MASTER=gpu-07:{port}"]  # fmt: skip


def test_sbatch_srun_alternative_and_header(workdir: Path, slurm_job: dict[str, str]) -> None:
    recording_command(workdir / "bin", "srun")
    env_vars = {**slurm_job, "LUMINA_LAUNCHER": "srun", "MASTER_PORT": "29555"}
    call = run_script(SBATCH, ["--preset", "b1"], cwd=workdir, extra_env=env_vars)
    assert call == ["--nodes", "2", "--ntasks-per-node", "8", "--export", "ALL", "python", "-u", "launch/train.py",
                    "--preset", "b1", "MASTER=gpu-07:29555"]  # fmt: skip
    # the allocation has the 8 tasks and 8 GPUs per node that both launchers start
    header = [line.split()[1] for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert {"--ntasks-per-node=8", "--gpus-per-node=8"} <= set(header)


def test_sbatch_gives_srun_the_allocations_cpus_per_task(workdir: Path, slurm_job: dict[str, str]) -> None:
    """Since Slurm 22.05 srun does not inherit --cpus-per-task: without SRUN_CPUS_PER_TASK each rank gets one core."""
    record = workdir / "calls" / "srun"
    fake_command(workdir / "bin", "srun", f'echo "CPUS=${{SRUN_CPUS_PER_TASK:-unset}}" > {record}')
    env_vars = {**slurm_job, "LUMINA_LAUNCHER": "srun", "SLURM_CPUS_PER_TASK": "8"}
    run_script(SBATCH, ["--preset", "b1"], cwd=workdir, extra_env=env_vars)
    assert record.read_text().strip() == "CPUS=8"
    header = [line.split()[1] for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "--cpus-per-task=8" in header


def test_sbatch_requeues_a_run_stopped_by_usr1_or_sigterm(workdir: Path, slurm_job: dict[str, str]) -> None:
    """A rank stopped by SIGUSR1 (--signal=USR1@600) exits 138 after its checkpoint: the job goes back in the queue;
    the script passes its signal lead on (LUMINA_SIGNAL_LEAD), which the run checks against what it measured."""
    record = workdir / "scontrol.calls"
    fake_command(workdir / "bin", "deepspeed", f'echo "$LUMINA_SIGNAL_LEAD" > {workdir / "lead"}; exit 138')
    fake_command(workdir / "bin", "scontrol", f'[[ "$1" == show ]] && printf "gpu-07\\n" || echo "$@" > {record}')
    env_vars = {**os.environ, **slurm_job, "PATH": f"{workdir / 'bin'}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(SBATCH), "--preset", "b1", "--auto-resume"], cwd=workdir, env=env_vars,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 138 and record.read_text().strip() == "requeue 4242"
    header = [line.split()[1] for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert {"--signal=USR1@600", "--requeue"} <= set(header)
    assert (workdir / "lead").read_text().strip() == "600"


def test_mpirun_example_on_a_hostfile_passes_the_rendezvous_variables(workdir: Path) -> None:
    recording_command(workdir / "bin", "mpirun")
    hostfile = ROOT / "launch" / "hostfile.example"
    env_vars = {"NP": "32", "HOSTFILE": str(hostfile), "PYTHON": "python3"}
    call = run_script(MPIRUN_EXAMPLE, ["--preset", "b300"], cwd=workdir, extra_env=env_vars)
    assert call[:6] == ["-np", "32", "--bind-to", "none", "--hostfile", str(hostfile)]
    exported = [call[i + 1] for i, arg in enumerate(call) if arg == "-x"]
    assert {"MASTER_ADDR", "MASTER_PORT", "PATH"} <= set(exported)
    # rank 0 on the hostfile's first host, on the default port
    assert call[-6:] == ["python3", "-u", "launch/train.py", "--preset", "b300", "MASTER=node-001:29500"]


def test_launch_scripts_are_valid_bash() -> None:
    for script in (SBATCH, MPIRUN_EXAMPLE):
        subprocess.run(["bash", "-n", str(script)], check=True)
        if shutil.which("shellcheck"):  # not installed on CI; developers run it
            subprocess.run(["shellcheck", str(script)], check=True)
