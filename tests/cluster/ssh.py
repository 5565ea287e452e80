"""ssh between the hosts of a namespace cluster (tests/cluster/harness.py), as a cluster's admin sets it up for
`deepspeed --hostfile` (pdsh) and `mpirun --hostfile` (Open MPI's rsh launcher): an `sshd` in every host, key
authentication only, one key pair and one host key made here, and a system-wide client config in every host
(/etc/ssh/ssh_config, bound over in the host's mount namespace) so that a plain `ssh host1` works from any host, as
the launchers run it. A command ssh starts runs in the namespaces of the target host's sshd, so it sees that host's
name, address and node-local scratch; its environment is sshd's fresh one (what the launchers forward, nothing more).
Needs Debian's openssh-server, openssh-client and pdsh (`make system-deps`)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tests.cluster.harness import LocalCluster

TOOLS = ("sshd", "ssh", "ssh-keygen", "pdsh")
CLIENT_CONFIG = Path("/etc/ssh/ssh_config")  # the mount point: ssh reads it whatever the user's ~/.ssh holds
READY_S = 30.0


def ssh_unavailable() -> str | None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} (openssh-server, openssh-client, pdsh)"
    return None if CLIENT_CONFIG.is_file() else f"needs {CLIENT_CONFIG} (openssh-client) to bind a config over"


def sshd_config(root: Path, host: str) -> str:
    # StrictModes no: the keys live under the test's directory, whose parents ssh would want root-only
    return f"""Port 22
ListenAddress 0.0.0.0
HostKey {root}/host_key
AuthorizedKeysFile {root}/id_ed25519.pub
PidFile {root}/sshd.{host}.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
"""


def ssh_config(root: Path) -> str:
    # BatchMode: a launcher's ssh must fail at once rather than ask for anything
    return f"""Host *
    User root
    IdentityFile {root}/id_ed25519
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    BatchMode yes
    ConnectTimeout 10
    LogLevel ERROR
"""


class Ssh:
    """sshd on every host of `cluster`; stopped with the hosts (the cluster's teardown kills their processes)."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster, self.root = cluster, cluster.root / "ssh"

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` with the cluster's ssh client config; give it to Host.start or Host.command (it mounts inside the
        host's own mount namespace, nothing outside changes)."""
        bind = f'mount --bind "{self.root}/ssh_config" {CLIENT_CONFIG} && exec "$@"'
        return ["sh", "-c", bind, "sh", *argv]

    def start(self) -> Ssh:
        self.root.mkdir(exist_ok=True)
        for key in ("host_key", "id_ed25519"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "lumina-cluster", "-f",
                            str(self.root / key)], check=True, capture_output=True, timeout=30)  # fmt: skip
        (self.root / "ssh_config").write_text(ssh_config(self.root))
        sshd = str(shutil.which("sshd"))  # sshd re-executes itself and refuses a relative path
        # privilege separation needs /run/sshd, which only a booted system's service manager creates: each host gets
        # a /run of its own (as a node has), made in its mount namespace
        run_dir = 'mount -t tmpfs -o mode=755 tmpfs /run && mkdir -m 755 /run/sshd && exec "$@"'
        for host in self.cluster.hosts:
            (self.root / f"sshd_config.{host.name}").write_text(sshd_config(self.root, host.name))
            argv = ["sh", "-c", run_dir, "sh", sshd, "-D", "-e", "-f", str(self.root / f"sshd_config.{host.name}")]
            host.start(self.wrap(argv), env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                       log=self.root / f"sshd.{host.name}.log", cwd=self.root)  # fmt: skip
        for host in self.cluster.hosts:
            self.wait_reachable(host.name)
        return self

    def wait_reachable(self, name: str) -> None:
        """Until `ssh NAME true` from the first host works (sshd listening), at most READY_S seconds."""
        deadline, command = time.monotonic() + READY_S, self.cluster.hosts[0].command(self.wrap(["ssh", name, "true"]))
        while True:
            done = subprocess.run(command, capture_output=True, text=True, timeout=READY_S)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                logs = "".join(p.read_text() for p in sorted(self.root.glob("sshd.*.log")))
                raise AssertionError(f"ssh {name} failed for {READY_S} s: {done.stderr}\n{logs}")
            time.sleep(0.2)
