"""Which network interface gloo uses across hosts.

Without GLOO_SOCKET_IFNAME, gloo binds the address its host name resolves to. On a host whose name is not in DNS, or
resolves to 127.0.1.1 (Debian's /etc/hosts), that is loopback: the ranks on other hosts are refused and the job dies
in `connectFullMesh` (seen in the cluster harness, tests/cluster). Every run has a gloo group (the CPU backend, and
the control group beside NCCL), so the interface is chosen for all of them: the one this host reaches MASTER_ADDR
through."""

from __future__ import annotations

import fcntl
import os
import socket
import struct

SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def source_address(master_addr: str) -> str | None:
    """The local IPv4 address this host sends to `master_addr` from (a UDP connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((master_addr, 9))
            return str(probe.getsockname()[0])
    except OSError:
        return None


def interface_with(address: str) -> str | None:
    """The name of the interface that holds IPv4 `address`, or None."""
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                reply = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
        if socket.inet_ntoa(reply[20:24]) == address:
            return name
    return None


def choose_gloo_interface() -> str | None:
    """Set GLOO_SOCKET_IFNAME to the interface that reaches MASTER_ADDR when the ranks span hosts and nobody set it;
    returns the name chosen (None: left as it was)."""
    master = os.environ.get("MASTER_ADDR", "")
    if "GLOO_SOCKET_IFNAME" in os.environ or not master:
        return None
    local = source_address(master)
    if local is None or local.startswith("127."):
        return None  # one host (loopback): gloo's own choice works
    name = interface_with(local)
    if name is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = name
    return name
