"""Node-local disks on two namespace hosts (each host sees its own scratch at the same path, as a node's /local): a
run directory there is refused by every rank with E003 naming it before any work; prepared shards there are built
once per host and the run trains."""

from __future__ import annotations

from pathlib import Path

from tests.cluster.harness import NODE_LOCAL
from tests.cluster.test_two_hosts import on_two_hosts, train_argv


def test_a_run_directory_on_node_local_disks_is_refused_and_shards_there_work(tmp_path: Path, shared_run: Path) -> None:
    tokenizer, local = shared_run / "tokenizer.json", tmp_path / NODE_LOCAL
    argv = train_argv(tokenizer, "local", ["--output-dir", str(local / "runs")])
    codes, logs = on_two_hosts(tmp_path, argv, run_id="local")
    assert codes == [1, 1], logs[-3000:]
    assert f"[E003] the run directory {local / 'runs' / 'local'} is not shared by the 4 ranks" in logs
    assert not (tmp_path / "scratch_host0" / "runs" / "local" / "checkpoints").exists()  # nothing trained
    argv = train_argv(tokenizer, "shards", ["--data-strategy", "sharded", "--prepared-dir", str(local / "prepared")])
    codes, logs = on_two_hosts(tmp_path, argv, run_id="shards")
    assert codes == [0, 0], logs[-3000:]
    for host in ("host0", "host1"):  # each host built its own shards on its own disk
        assert list((tmp_path / f"scratch_{host}" / "prepared").rglob("part-*.tokens.npy")), host
    assert (tmp_path / "runs" / "shards" / "checkpoints").is_dir()
