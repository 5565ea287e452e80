"""E308: a collective that lost a peer names the ranks of the lost host, from the table every rank records at start
(gloo's error gives only the peer's address)."""

from __future__ import annotations

from lumina_ds.distributed.peers import Peer, lost_peer_error

PEERS = [Peer(0, "host0", "10.1.0.1"), Peer(1, "host0", "10.1.0.1"), Peer(2, "host1", "10.1.0.2"),
         Peer(3, "host1", "10.1.0.2")]  # fmt: skip
GLOO = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [10.1.0.1]:24482: Connection reset by "
        "peer. This is typically caused by a remote worker hanging")  # fmt: skip


def test_the_lost_host_is_named_with_its_ranks() -> None:
    error = lost_peer_error(RuntimeError(GLOO), PEERS, rank=3)
    assert error is not None and error.code == "E308"
    assert "rank 3 lost contact with rank(s) 0, 1 on host0 (10.1.0.1)" in error.message
    assert "resumes from the last complete checkpoint" in error.hint


def test_an_address_no_rank_had_and_other_errors() -> None:
    error = lost_peer_error(RuntimeError(GLOO.replace("10.1.0.1", "10.9.9.9")), PEERS, rank=3)
    assert error is not None and "a peer at 10.9.9.9" in error.message
    assert lost_peer_error(RuntimeError("CUDA out of memory"), PEERS, rank=0) is None
    # one host: every rank has the same address; the others are named, never the rank that reports
    local = [Peer(r, "box", "127.0.0.1") for r in range(2)]
    error = lost_peer_error(RuntimeError(GLOO.replace("10.1.0.1", "127.0.0.1")), local, rank=0)
    assert error is not None and "rank(s) 1 on box (127.0.0.1)" in error.message
