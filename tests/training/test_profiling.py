"""--profile-training and --profile-memory: the profiler's schedule, its files, and per-phase peak memory."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from lumina_ds.training.profiling import (
    MEMORY_FILE,
    TOP_OPS_FILE,
    TRACE_FILE,
    WAIT_STEPS,
    WARMUP_STEPS,
    PhaseMemory,
    TrainingProfiler,
)
from lumina_ds.training.train_module import TrainModule
from tests.runs import FAST, TRAIN, here
from tests.training.fakes import FakeEngine, tiny_model, train_batches

MIB = 2**20


def _train(profiler: TrainingProfiler, steps: int) -> None:
    a = torch.randn(96, 96)
    profiler.on_train_start({"total_steps": steps, "start_step": 0})
    for step in range(1, steps + 1):
        for _ in range(step):  # step k runs k matmuls: the recorded steps are countable in the table
            a = torch.mm(a, a).tanh()
        profiler.on_step(step)
    profiler.on_train_end({})


def _table_rows(text: str) -> list[tuple[str, float, int]]:
    rows = []
    for line in text.splitlines()[2:]:
        match = re.match(r"(.+?)\s+([\d.]+)\s+[\d.]+%\s+(\d+)$", line)
        assert match, line
        rows.append((match.group(1).strip(), float(match.group(2)), int(match.group(3))))
    return rows


def test_profiler_records_the_active_steps_after_wait_and_warmup(tmp_path: Path) -> None:
    profiler = TrainingProfiler(tmp_path, active_steps=3, cuda=False)
    _train(profiler, steps=8)
    trace = json.loads((tmp_path / TRACE_FILE).read_text())
    steps = sorted(e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#"))
    assert WAIT_STEPS + WARMUP_STEPS == 2
    assert steps == ["ProfilerStep#2", "ProfilerStep#3", "ProfilerStep#4"]  # steps 3, 4, 5 of the run (0-based)
    rows = _table_rows((tmp_path / TOP_OPS_FILE).read_text())
    assert 0 < len(rows) <= 20
    assert [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True)  # by self time
    calls = {name: count for name, _, count in rows}
    assert calls["aten::mm"] == 3 + 4 + 5  # run steps 3..5, step k runs k matmuls; nothing before or after
    assert profiler.profiler is None  # stopped once the schedule was done, not at the end of training


def test_a_run_shorter_than_wait_and_warmup_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _train(TrainingProfiler(tmp_path, active_steps=3, cuda=False), steps=2)
    assert not (tmp_path / TRACE_FILE).exists()
    assert "nothing recorded" in capsys.readouterr().out


def test_a_run_ending_mid_window_writes_the_steps_it_reached(tmp_path: Path) -> None:
    _train(TrainingProfiler(tmp_path, active_steps=5, cuda=False), steps=4)
    calls = {name: count for name, _, count in _table_rows((tmp_path / TOP_OPS_FILE).read_text())}
    assert calls["aten::mm"] == 3 + 4


class _BlockEngine(FakeEngine):
    """Touches a block of memory in each phase: 160 MiB in an evaluation forward, 1 MiB in a training forward,
    96 MiB in backward (touched pages stay resident until freed)."""

    evaluating = False

    def _block(self, mib: int) -> None:
        block = torch.ones(mib * MIB // 4)
        del block

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._block(160 if self.evaluating else 1)
        return super().__call__(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self._block(96)
        super().backward(loss)

    def eval(self) -> None:
        self.evaluating = True

    def train(self, mode: bool = True) -> None:
        self.evaluating = False


def test_phase_memory_gives_each_phase_its_own_peak(tmp_path: Path) -> None:
    module = TrainModule(_BlockEngine(tiny_model()))
    memory = PhaseMemory(tmp_path, cuda=False)
    memory.wrap(module)
    memory.on_train_start({})
    batches = iter(train_batches(8))  # endless: it starts the next epoch when one ends
    module.eval_loss_sums(itertools.islice(batches, 1))  # an evaluation forward: not a training phase
    for step in (1, 2):
        module.train_step(batches, step=step, data_step=step)
    memory.on_train_end({})
    report = json.loads((tmp_path / MEMORY_FILE).read_text())
    phases = report["phases"]
    assert report["measure"] == "peak_rss" and list(phases) == ["forward", "backward", "optimizer_step"]
    assert phases["backward"]["increase_bytes"] >= 90 * MIB  # the 96 MiB block, seen although freed in the phase
    assert phases["forward"]["increase_bytes"] < 40 * MIB  # neither the evaluation's 160 MiB nor backward's block
    assert phases["optimizer_step"]["increase_bytes"] < 40 * MIB
    for row in phases.values():
        assert row["peak_rss_bytes"] == row["at_start_bytes"] + row["increase_bytes"]


def test_train_with_profiling_and_a_generation_check(tmp_path: Path) -> None:
    args = ["train", "--train-data", TRAIN, *FAST, "--max-steps", "5", "--save-every-n-steps", "100",
            "--output-dir", str(tmp_path), "--experiment-name", "p", "--profile-training", "2", "--profile-memory",
            "--test-generation"]  # fmt: skip
    proc = here(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "p"
    trace = json.loads((run_dir / "profile" / TRACE_FILE).read_text())
    steps = sorted(e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#"))
    assert steps == ["ProfilerStep#2", "ProfilerStep#3"]  # 1 wait + 1 warm-up step, then 2 recorded
    table = (run_dir / "profile" / TOP_OPS_FILE).read_text()
    assert "aten::mm" in table and table in proc.stdout + "\n"
    phases = json.loads((run_dir / "profile" / MEMORY_FILE).read_text())["phases"]
    assert list(phases) == ["forward", "backward", "optimizer_step"]
    assert all(row["peak_rss_bytes"] > 100 * MIB for row in phases.values())  # a whole training process
    records = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert len(records) == 5 and {r["precision"] for r in records} == {"fp32"}
    assert all(0 < r["tokens"] == len(r["token_ids"]) <= 64 for r in records)
