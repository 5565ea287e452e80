"""Hostfile launchers between two namespace hosts of two ranks each, over ssh (tests/cluster/ssh.py: an sshd in each
host, key authentication, a plain `ssh host1` works from any host), each started on the first host as a user types it:

- `deepspeed --hostfile H launch/train.py …` (pdsh, its default): the runner asks the first host its address over ssh
  (`hostname -I`), and pdsh runs DeepSpeed's per-node launcher on every host through ssh, the first included;
- `mpirun --hostfile H -np 4 python launch/train.py …` (Open MPI 4.1): mpirun starts its daemon on the other host
  over ssh; no MASTER_ADDR/MASTER_PORT, so the ranks meet through mpi4py (rank 0's `hostname -I`, a free port).

The remote ranks see only what the launchers forward: sshd's fresh environment (PATH, HOME; bash reads root's
~/.bashrc), plus `PYTHON*` and `.deepspeed_env` under pdsh, `-x` under mpirun. Neither launch needed anything else on
CPU: DeepSpeed's per-node launcher picks the CPU accelerator itself, each rank sets DS_ACCELERATOR and its thread
count itself, and gloo's interface comes from the route to MASTER_ADDR. Prepared shards go to node-local disks, so
each host's local rank 0 must build its host's shards: the local ranks each launcher gives are checked with the
losses (those of four ranks on one host, EP 2, ZeRO-2, 1e-5)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.cluster.harness import NODE_LOCAL, LocalCluster, wait_all
from tests.cluster.ssh import Ssh, ssh_unavailable
from tests.cluster.test_two_hosts import RUN_TIMEOUT_S, on_one_host, train_argv
from tests.runs import ROOT, child_env, losses

pytestmark = pytest.mark.skipif(ssh_unavailable() is not None, reason=str(ssh_unavailable()))

LAYOUT = ["--zero-stage", "2", "--expert-parallel-size", "2"]
SCRIPT = str(ROOT / "launch" / "train.py")  # `lumina-ds train` as launchers start it
HOSTS = ("host0", "host1")


def train_flags(tokenizer: Path, name: str, root: Path) -> list[str]:
    """launch/train.py's flags (train_argv less `-m lumina_ds train`), shards prepared on each host's own disk."""
    local = ["--data-strategy", "sharded", "--prepared-dir", str(root / NODE_LOCAL / "prepared")]
    return train_argv(tokenizer, name, [*LAYOUT, *local])[3:]


@pytest.fixture(scope="module")
def one_host(tmp_path_factory: pytest.TempPathFactory, shared_run: Path) -> dict[int, float]:
    """The losses of four ranks on one host (torchrun), for both launchers."""
    root = tmp_path_factory.mktemp("one_host")
    on_one_host(root, train_argv(shared_run / "tokenizer.json", "one_host", LAYOUT))
    return losses(root / "runs" / "one_host")


def launch_from_first_host(root: Path, argv: list[str]) -> str:
    """`argv` on host0 of two new hosts with sshd (`root/hostfile`: two slots each), run to a successful end; its
    output."""
    (root / "hostfile").write_text("".join(f"{host} slots=2\n" for host in HOSTS))
    log = root / "launcher.log"
    with LocalCluster(2, root=root) as cluster:
        ssh = Ssh(cluster).start()
        proc = cluster.hosts[0].start(ssh.wrap(argv), env=child_env(2), log=log, cwd=root)
        [code] = wait_all([proc], timeout=RUN_TIMEOUT_S)
    assert code == 0, log.read_text()[-6000:]
    return log.read_text()


def assert_trained_on_both_hosts(root: Path, name: str, expected: dict[int, float]) -> None:
    """Each host's local rank 0 built its host's shards on its own disk; the losses are the one-host run's."""
    for host in HOSTS:
        assert list((root / f"scratch_{host}" / "prepared").rglob("part-*.tokens.npy")), host
    got = losses(root / "runs" / name)
    assert sorted(got) == sorted(expected)
    assert all(abs(got[s] - expected[s]) <= 1e-5 for s in got), (got, expected)


def test_deepspeed_hostfile_over_pdsh(tmp_path: Path, shared_run: Path, one_host: dict[int, float]) -> None:
    deepspeed = str(Path(sys.executable).parent / "deepspeed")  # the venv's console script, as a user runs it
    argv = [deepspeed, "--hostfile", str(tmp_path / "hostfile"), SCRIPT,
            *train_flags(shared_run / "tokenizer.json", "pdsh", tmp_path)]  # fmt: skip
    log = launch_from_first_host(tmp_path, argv)
    assert re.search(r"^host1: .*nnodes=2, num_local_procs=2, node_rank=1$", log, re.MULTILINE), log[-6000:]
    assert_trained_on_both_hosts(tmp_path, "pdsh", one_host)


def test_mpirun_hostfile(tmp_path: Path, shared_run: Path, one_host: dict[int, float]) -> None:
    # --bind-to none: Open MPI pins each rank to one core by default (launch/mpirun_example.sh says why not)
    argv = ["mpirun", "--hostfile", str(tmp_path / "hostfile"), "-np", "4", "--allow-run-as-root", "--bind-to",
            "none", "--display-map", sys.executable, "-u", SCRIPT,
            *train_flags(shared_run / "tokenizer.json", "mpirun", tmp_path)]  # fmt: skip
    log = launch_from_first_host(tmp_path, argv)
    assert re.search(r"Data for node: host1\s+Num slots: 2\s+Max slots: \d+\s+Num procs: 2", log), log[-6000:]
    assert_trained_on_both_hosts(tmp_path, "mpirun", one_host)
