"""The universal conversion split across ranks (training/universal_split.py) writes, file for file and byte for byte,
what DeepSpeed's own single-process converter writes; the ranks' checksum lists cover every file once. The elastic
resumes through it (world size 2 -> 1 with EP 2 -> 1, 1 -> 2 at ZeRO-3) are in tests/integration/test_distributed.py."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from lumina_ds.errors import CheckpointError
from lumina_ds.training.universal import MARKER, convert, convert_share, finish, prepare, reusable, staging
from lumina_ds.training.universal_split import shares
from tests.runs import FAST, TRAIN, ranks


@pytest.fixture(scope="module")
def tags(shared_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Two-rank AutoEP (EP 2) tags after 2 steps, fp32, at ZeRO-2 and ZeRO-3 (the two converter paths)."""
    root, found = tmp_path_factory.mktemp("split"), {}
    for stage in (2, 3):
        done = ranks(["train", *FAST, "--train-data", TRAIN, "--tokenizer", str(shared_run / "tokenizer.json"),
                      "--no-progress-bar", "--precision", "fp32", "--max-steps", "2", "--save-every-n-steps", "2",
                      "--zero-stage", str(stage), "--expert-parallel-size", "2", "--experiment-name", f"z{stage}"],
                     cwd=root)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        found[stage] = root / "runs" / f"z{stage}" / "checkpoints" / "step_00000002"
    return found


def _split(tag: Path, target: Path, world: int) -> None:
    """`world` ranks' shares at once (threads, each running its subprocess), then rank 0's finish."""
    prepare(target)
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda r=rank: results.append(convert_share(tag, target, rank=r, world=world)))
        for rank in range(world)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * world
    finish(tag, target)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stage", [2, 3])
def test_the_split_conversion_writes_deepspeeds_files_byte_for_byte(
    stage: int, tags: dict[int, Path], tmp_path: Path
) -> None:
    tag = tags[stage]
    reference = tmp_path / "one" / "step_00000002"
    convert(tag, reference)  # DeepSpeed's ds_to_universal in one process
    expected = _files(reference)
    assert any(name.endswith("experts.w1/exp_avg.pt") for name in expected)  # the AutoEP experts are in it
    for world in (2, 3):  # 3: the parameters do not divide evenly
        target = tmp_path / f"split{world}" / "step_00000002"
        _split(tag, target, world)
        got = _files(target)
        assert got.keys() == expected.keys()
        differ = [name for name in expected if got[name] != expected[name]]
        assert not differ, (world, differ)  # the marker too: the same checksums, listed once each
        assert reusable(target, tag) is None
        assert not staging(target).exists() and not (target / "tmp").exists()


def test_a_rank_whose_share_fails_leaves_the_conversion_unsealed(tags: dict[int, Path], tmp_path: Path) -> None:
    """A missing part (here rank 1's share never ran) is found by the finish, not sealed as verified."""
    target = tmp_path / "partial" / "step_00000002"
    prepare(target)
    assert convert_share(tags[3], target, rank=0, world=2)
    with pytest.raises(CheckpointError) as err:
        finish(tags[3], target)
    assert err.value.code == "E303" and "incomplete" in err.value.message and "ranks [0] of 2" in err.value.message
    assert not (target / MARKER).exists()


def test_the_parameters_are_dealt_in_contiguous_runs_of_about_equal_size() -> None:
    sizes = {"embed": 600, "l0.attn": 300, "l0.experts": 900, "l0.norm": 10, "l1.attn": 300, "l1.experts": 900}
    dealt = shares(sizes, 3)
    assert dealt == [{"embed", "l0.attn"}, {"l0.experts", "l0.norm", "l1.attn"}, {"l1.experts"}]  # 900, 1210, 900
    assert shares(sizes, 1) == [set(sizes)]
    assert shares({"a": 5}, 3) == [set(), {"a"}, set()]  # more ranks than parameters: some convert nothing
    assert shares({}, 2) == [set(), set()]
