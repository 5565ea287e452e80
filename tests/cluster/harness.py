"""A cluster on one machine: N hosts, each a Linux network namespace with its own hostname (UTS namespace), address and
node-local scratch directory (mount namespace), joined by veth pairs to a bridge that lives in a namespace of its own.
The run directory is shared, as on a cluster's shared filesystem. Addresses exist only inside the namespaces made
here; everything is torn down at exit, and every wait is bounded. Needs root and iproute2.

    with LocalCluster(2, root=tmp_path) as cluster:
        proc = cluster.hosts[0].start(["python", "-m", "lumina_ds", ...], env=env, log=tmp_path / "host0.log")
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

INTERFACE = "eth0"  # each host's link to the bridge, as a cluster node's NIC
NODE_LOCAL = "node_local"  # under the cluster's root: every host sees its own scratch there


def cluster_unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (network, UTS and mount namespaces)"
    missing = [tool for tool in ("ip", "unshare") if shutil.which(tool) is None]
    return f"needs {', '.join(missing)} (iproute2, util-linux)" if missing else None


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)


@dataclass
class Host:
    name: str
    netns: str
    address: str
    scratch: Path  # what this host sees at the cluster's node-local path
    node_local: Path
    hosts_file: Path  # bound over /etc/hosts inside the host
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run as this host: in its network namespace, with its hostname, its node-local scratch, and the
        cluster's names in /etc/hosts (as a cluster's DNS resolves its nodes)."""
        setup = (f'hostname {self.name} && mount --bind "{self.scratch}" "{self.node_local}" && '
                 f'mount --bind "{self.hosts_file}" /etc/hosts && exec "$@"')  # fmt: skip
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--mount", "--propagation", "private",
                "sh", "-c", setup, "sh", *argv]  # fmt: skip

    def start(self, argv: list[str], *, env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
        """Start `argv` on this host in a session of its own (killing the host kills the session)."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(self.command(argv), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
        self.procs.append(proc)
        return proc

    def kill(self) -> None:
        """What a node failure does to its processes: SIGKILL to every process in the host's network namespace (a
        launcher's workers may be in sessions of their own), no cleanup."""
        for _ in range(3):  # a process forking meanwhile is caught by the next pass
            pids = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True, timeout=30)
            for pid in map(int, pids.stdout.split()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for proc in self.procs:
            proc.wait(timeout=30)


class LocalCluster:
    """`n` hosts on a private /24; host i is `host{i}` at .(i + 1)."""

    def __init__(self, n: int, *, root: Path) -> None:
        tag = f"{os.getpid() % 100000}{random.randrange(100)}"
        self.switch = f"lsw{tag}"
        subnet = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
        self.root = root
        node_local = root / NODE_LOCAL
        node_local.mkdir(parents=True, exist_ok=True)
        hosts_file = root / "etc_hosts"
        self.hosts = [
            Host(f"host{i}", f"lh{tag}x{i}", f"{subnet}.{i + 1}", root / f"scratch_host{i}", node_local, hosts_file)
            for i in range(n)
        ]
        names = "".join(f"{h.address} {h.name}\n" for h in self.hosts)
        hosts_file.write_text(f"127.0.0.1 localhost\n{names}")

    def __enter__(self) -> LocalCluster:
        try:
            sh("ip", "netns", "add", self.switch)
            sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.switch, "link", "set", "br0", "up")
            for i, host in enumerate(self.hosts):
                self._add(i, host)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _add(self, i: int, host: Host) -> None:
        host.scratch.mkdir(parents=True, exist_ok=True)
        sh("ip", "netns", "add", host.netns)
        outside, inside = f"lv{i}{self.switch[3:]}"[:15], f"lh{i}{self.switch[3:]}"[:15]
        sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        sh("ip", "link", "set", outside, "netns", self.switch)
        sh("ip", "link", "set", inside, "netns", host.netns)
        sh("ip", "-n", self.switch, "link", "set", outside, "master", "br0", "up")
        sh("ip", "-n", host.netns, "link", "set", inside, "name", INTERFACE)
        sh("ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", INTERFACE)
        sh("ip", "-n", host.netns, "link", "set", INTERFACE, "up")
        sh("ip", "-n", host.netns, "link", "set", "lo", "up")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for host in self.hosts:
            host.kill()
        for name in [h.netns for h in self.hosts] + [self.switch]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def wait_all(procs: list[subprocess.Popen[bytes]], *, timeout: float) -> list[int]:
    """Every process's exit code; the ones still running after `timeout` seconds are killed (code -9)."""
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            codes.append(proc.wait(timeout=30))
    return codes
