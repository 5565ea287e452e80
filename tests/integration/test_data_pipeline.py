"""The data strategies through the CLI: prepared shards reused, the same losses for every strategy, exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.runs import EVAL, FAST, TRAIN, here, ranks, read_metrics


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    proc = here(["tokenizer", "train", TRAIN, "--vocab-size", "1024", "--output", str(path)], cwd=path.parent)
    assert proc.returncode == 0 and "1,024 tokens" in proc.stdout
    return path


def train(workdir: Path, name: str, tokenizer: Path, *extra: str) -> Path:
    args = [*FAST, "--train-data", f"{TRAIN},{EVAL}:0.5", "--tokenizer", str(tokenizer), "--max-steps", "8"]
    args += ["--experiment-name", name, "--output-dir", "runs", "--eval-every-n-steps", "100", *extra]
    proc = here(["train", *args], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir / "runs" / name


def test_prepare_data_then_train_reuses_the_shards(workdir: Path, small_tokenizer: Path) -> None:
    prepare = ["prepare-data", TRAIN, EVAL, "--tokenizer", str(small_tokenizer), "--output", "prep"]
    first = here(prepare, cwd=workdir)
    assert first.returncode == 0 and "reused" not in first.stdout
    assert len(list((workdir / "prep").glob("conversations-*"))) == 1
    proc = here(
        ["train", *FAST, "--train-data", TRAIN, "--tokenizer", str(small_tokenizer), "--max-steps", "2",
         "--prepared-dir", "prep", "--data-strategy", "sharded", "--output-dir", "runs"],
        cwd=workdir,
    )  # fmt: skip
    assert proc.returncode == 0
    assert "data strategy: sharded" in proc.stdout and "reused prepared shards" in proc.stdout
    assert len(list((workdir / "prep").glob("conversations-*"))) == 1  # nothing rebuilt


def test_every_strategy_trains_on_the_same_tokens_and_resumes_exactly(workdir: Path, small_tokenizer: Path) -> None:
    memory = train(workdir, "memory", small_tokenizer, "--data-strategy", "memory", "--save-every-n-steps", "4")
    reference, _ = read_metrics(memory)
    assert [r["step"] for r in reference] == list(range(1, 9))
    for strategy in ("sharded", "streaming"):
        logs, _ = read_metrics(train(workdir, strategy, small_tokenizer, "--data-strategy", strategy))
        assert [r["loss"] for r in logs] == pytest.approx([r["loss"] for r in reference], abs=1e-6), strategy
    resumed = train(
        workdir, "resumed", small_tokenizer, "--force-streaming", "--num-workers", "2",
        "--resume", str(memory / "checkpoints" / "step_00000004"),
    )  # fmt: skip
    logs, _ = read_metrics(resumed)
    assert [r["step"] for r in logs] == [5, 6, 7, 8]
    assert [r["loss"] for r in logs] == pytest.approx([r["loss"] for r in reference[4:]], abs=1e-6)


def test_two_ranks_train_the_same_from_shards_built_once_and_from_streaming(
    workdir: Path, small_tokenizer: Path
) -> None:
    """Local rank 0 builds the missing shards while rank 1 waits; streaming workers forked under gloo agree."""
    common = [*FAST, "--train-data", f"{TRAIN},{EVAL}:0.5", "--tokenizer", str(small_tokenizer), "--max-steps", "4",
              "--output-dir", "runs", "--zero-stage", "2", "--eval-every-n-steps", "100"]  # fmt: skip
    common.append("--no-progress-bar")
    sharded = ranks(["train", *common, "--experiment-name", "sharded", "--data-strategy", "sharded"], cwd=workdir)
    assert sharded.returncode == 0 and "reused" not in sharded.stdout, sharded.stderr[-3000:]
    assert len(list((workdir / "runs" / "prepared").glob("conversations-*"))) == 1  # built once, not per rank
    streaming = ranks(["train", *common, "--experiment-name", "streaming", "--force-streaming", "--num-workers", "2"],
                      cwd=workdir)  # fmt: skip
    assert streaming.returncode == 0, streaming.stderr[-3000:]
    (a, _), (b, _) = read_metrics(workdir / "runs" / "sharded"), read_metrics(workdir / "runs" / "streaming")
    assert [r["step"] for r in a] == [1, 2, 3, 4]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], abs=1e-6)
