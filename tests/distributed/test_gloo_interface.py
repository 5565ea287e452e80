"""gloo's interface across hosts: the one that holds the address this host reaches MASTER_ADDR from; loopback and a
GLOO_SOCKET_IFNAME the user set are left alone. (The two-host runs of tests/cluster need it: there each host's name
resolves to nothing, and gloo bound loopback.)"""

from __future__ import annotations

import os

import pytest

from lumina_ds.distributed.gloo_interface import choose_gloo_interface, interface_with, source_address


def test_the_interface_is_found_by_its_address() -> None:
    assert source_address("127.0.0.1") == "127.0.0.1"
    assert interface_with("127.0.0.1") == "lo"
    assert interface_with("192.0.2.1") is None  # TEST-NET-1: held by no interface here


def test_one_host_and_a_users_choice_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert choose_gloo_interface() is None
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "ib0")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    assert choose_gloo_interface() is None
    assert os.environ["GLOO_SOCKET_IFNAME"] == "ib0"
