"""SLURM on the namespace cluster (tests/cluster/harness.py): a munge daemon with a key made here, `slurmctld` on the
first host and one `slurmd` per host, each host a node of one partition; jobs are submitted with `sbatch` on the
first host as a user would. slurmd needs a cgroup filesystem: each host mounts a freezer hierarchy in its own mount
namespace. Needs Debian's slurm-wlm and munge (`make system-deps`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from tests.cluster.harness import LocalCluster

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")
# a job step credential's lifetime (SLURM's default 120 s): slurmd refuses a requeued job until the credentials it
# revoked for the last launch expire, and slurmctld holds a requeued job that long
CRED_EXPIRE_S = 10


def slurm_unavailable() -> str | None:
    missing = [tool for tool in DAEMONS if shutil.which(tool) is None]
    return f"needs {', '.join(missing)} (slurm-wlm, munge)" if missing else None


def slurm_conf(cluster: LocalCluster, root: Path, socket: Path) -> str:
    spool, head = root / "spool", cluster.hosts[0]
    nodes = "\n".join(f"NodeName={h.name} NodeAddr={h.address} CPUs=2 RealMemory=4000" for h in cluster.hosts)
    return f"""ClusterName=lumina
SlurmctldHost={head.name}({head.address})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={socket},cred_expire={CRED_EXPIRE_S}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
StateSaveLocation={spool}/ctld
SlurmdSpoolDir={spool}/d_%n
SlurmctldPidFile={spool}/ctld.pid
SlurmdPidFile={spool}/d_%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd_%n.log
{nodes}
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class Slurm:
    """The daemons of one test's SLURM cluster; stopped with the cluster's hosts (their namespaces' processes)."""

    def __init__(self, cluster: LocalCluster, root: Path) -> None:
        self.cluster, self.root = cluster, root / "slurm"
        self.root.mkdir(exist_ok=True)
        self.env = {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}

    def start(self) -> Slurm:
        munge = self.root / "munge"
        munge.mkdir(mode=0o700, exist_ok=True)
        (munge / "munge.key").write_bytes(os.urandom(1024))
        (munge / "munge.key").chmod(0o600)
        subprocess.run(["munged", "-f", f"--key-file={munge / 'munge.key'}", f"--socket={munge / 'socket'}",
                        f"--pid-file={munge / 'pid'}", f"--log-file={munge / 'log'}", f"--seed-file={munge / 'seed'}"],
                       check=True, capture_output=True, timeout=30)  # fmt: skip
        (self.root / "slurm.conf").write_text(slurm_conf(self.cluster, self.root, munge / "socket"))
        (self.root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nConstrainCores=no\nConstrainRAMSpace=no\n")
        for host in self.cluster.hosts:
            (self.root / "spool" / f"d_{host.name}").mkdir(parents=True, exist_ok=True)
        head = self.cluster.hosts[0]
        head.start(["slurmctld", "-D", "-i"], env=self.env, log=self.root / "slurmctld.out", cwd=self.root)
        cgroup = ("mount -t tmpfs none /sys/fs/cgroup && mkdir -p /sys/fs/cgroup/freezer && "
                  "mount -t cgroup -o freezer none /sys/fs/cgroup/freezer")  # fmt: skip
        for host in self.cluster.hosts:
            host.start(["sh", "-c", f'{cgroup} && exec slurmd -D -N {host.name}'], env=self.env,
                       log=self.root / f"slurmd_{host.name}.out", cwd=self.root)  # fmt: skip
        self.wait(lambda: self.run("sinfo", "-h", "-o", "%t").split() == ["idle"], "every node idle", 60)
        return self

    def stop(self) -> None:
        """munged runs outside the hosts (the cluster's teardown stops the rest)."""
        socket = self.root / "munge" / "socket"
        if socket.exists():
            subprocess.run(["munged", "-s", f"--socket={socket}"], capture_output=True, timeout=30)

    def run(self, *argv: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """A SLURM command on the first host; its stdout."""
        done = subprocess.run(self.cluster.hosts[0].command(list(argv)), env=env or self.env, cwd=cwd or self.root,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
        return done.stdout

    def sbatch(self, argv: list[str], *, env: dict[str, str], cwd: Path) -> int:
        out = self.run("sbatch", *argv, env={**env, "SLURM_CONF": self.env["SLURM_CONF"]}, cwd=cwd)
        match = re.search(r"Submitted batch job (\d+)", out)
        assert match, out
        return int(match[1])

    @staticmethod
    def wait(condition: object, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():  # type: ignore[operator]
            assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
            time.sleep(0.5)
