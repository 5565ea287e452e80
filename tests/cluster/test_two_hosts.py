"""Two hosts of two ranks each, made of namespaces on this machine (tests/cluster/harness.py), launched by torchrun
with a static rendezvous as on two nodes: the same losses as four ranks on one host, with expert parallelism within
the hosts (EP 2, ZeRO-2) and across them (EP 4, ZeRO-3). Each host resolves no name of the other: gloo's interface
is chosen from the route to MASTER_ADDR (lumina_ds/distributed/gloo_interface.py), without which gloo bound
loopback and the ranks on the other host were refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lumina_ds.distributed.env import free_port
from tests.cluster.harness import LocalCluster, wait_all
from tests.runs import FAST, TRAIN, child_env, losses

RUN_TIMEOUT_S = 300


def train_argv(tokenizer: Path, name: str, extra: list[str]) -> list[str]:
    return ["-m", "lumina_ds", "train", *FAST, "--train-data", TRAIN, "--tokenizer", str(tokenizer), "--precision",
            "fp32", "--max-steps", "6", "--no-progress-bar", "--experiment-name", name, *extra]  # fmt: skip


def torchrun(*, nodes: int, node_rank: int, master: str, port: int, run_id: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
            "--nproc-per-node", str(4 // nodes), "--node-rank", str(node_rank), "--master-addr", master,
            "--master-port", str(port), "--rdzv-id", run_id]  # fmt: skip


def on_two_hosts(root: Path, argv: list[str], *, run_id: str) -> tuple[list[int], str]:
    """torchrun on two new hosts (host0 the master); every host's exit code and both logs (`<run_id>.<host>.log`)."""
    with LocalCluster(2, root=root) as cluster:
        master, port = cluster.hosts[0].address, free_port()
        procs = [host.start([*torchrun(nodes=2, node_rank=i, master=master, port=port, run_id=run_id), *argv],
                            env=child_env(2), log=root / f"{run_id}.{host.name}.log", cwd=root)
                 for i, host in enumerate(cluster.hosts)]  # fmt: skip
        codes = wait_all(procs, timeout=RUN_TIMEOUT_S)
    return codes, "\n".join((root / f"{run_id}.host{i}.log").read_text() for i in range(2))


def on_one_host(root: Path, argv: list[str]) -> None:
    cmd = [*torchrun(nodes=1, node_rank=0, master="127.0.0.1", port=free_port(), run_id="single"), *argv]
    done = subprocess.run(cmd, cwd=root, env=child_env(4), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


LAYOUTS = {"ep2-zero2": ["--zero-stage", "2", "--expert-parallel-size", "2"],
           "ep4-zero3": ["--zero-stage", "3", "--expert-parallel-size", "4"]}  # fmt: skip


@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_two_hosts_of_two_ranks_train_like_four_ranks_on_one(
    tmp_path: Path, shared_run: Path, layout: list[str]
) -> None:
    tokenizer = shared_run / "tokenizer.json"
    codes, logs = on_two_hosts(tmp_path, train_argv(tokenizer, "two_hosts", layout), run_id="two-hosts")
    assert codes == [0, 0], logs[-6000:]
    on_one_host(tmp_path, train_argv(tokenizer, "one_host", layout))
    got, expected = losses(tmp_path / "runs" / "two_hosts"), losses(tmp_path / "runs" / "one_host")
    assert sorted(got) == list(range(1, 7))
    assert all(abs(got[s] - expected[s]) <= 1e-5 for s in got), (got, expected)
