"""The run report, drawn from a real run's metrics.jsonl (one tiny 1-process `debug` run shared by the tests)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from lumina_ds.cli import main
from lumina_ds.errors import LuminaError
from lumina_ds.monitor.report import TITLES, RunMetrics, RunReport, draw_report, expert_load, load_run
from tests.runs import SHARED_STEPS

STEPS, EVERY = SHARED_STEPS, 4  # the shared run: an evaluation every 4 steps
TOKENS_PER_STEP = 4 * 128  # FAST: micro-batch 4 rows of 128 tokens, one process, no accumulation


@pytest.fixture(scope="module")
def run_dir(shared_run: Path) -> Path:
    return shared_run


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    return int(width), int(height)


def copy_run(run_dir: Path, target: Path, *, edit: Any = None) -> Path:
    """A copy of the run's metrics.jsonl, each record passed through `edit` when given."""
    target.mkdir()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    if edit is not None:
        records = [edit(record) for record in records]
    (target / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return target


def test_training_ends_with_a_report_of_at_least_1000_by_600(run_dir: Path) -> None:
    assert png_size(run_dir / "report.png") == (1600, 1000)


def test_every_panel_is_drawn_and_the_loss_is_against_training_tokens(run_dir: Path) -> None:
    figure = draw_report([load_run(run_dir)])
    titles = [ax.get_title() for ax in figure.axes]
    assert set(TITLES) <= set(titles)
    loss = figure.axes[titles.index("Loss")]
    lines = {line.get_label(): line for line in loss.get_lines()}
    assert list(lines["train"].get_xdata()) == [TOKENS_PER_STEP * step for step in range(1, STEPS + 1)]
    assert list(lines["eval"].get_xdata()) == [TOKENS_PER_STEP * s for s in range(EVERY, STEPS + 1, EVERY)]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert list(lines["eval"].get_ydata()) == [r["eval_loss"] for r in records if "eval_loss" in r]


def test_the_expert_load_is_each_layers_share_over_an_even_share(run_dir: Path) -> None:
    run = load_run(run_dir)
    rows, steps, layers, experts = expert_load(run)
    assert (layers, experts) == (2, 4) and steps == [float(s) for s in range(1, STEPS + 1)]
    first = run.train[0]["expert_counts"]
    assert sum(first[1]) == TOKENS_PER_STEP * 2  # top-2: every token counted twice per layer
    assert [rows[4 + e][0] for e in range(4)] == pytest.approx([4 * c / (TOKENS_PER_STEP * 2) for c in first[1]])
    figure = draw_report([run])
    heatmap = figure.axes[[ax.get_title() for ax in figure.axes].index("Expert load")]
    assert heatmap.get_images()[0].get_array().shape == (layers * experts, STEPS)


def test_fields_an_old_run_lacks_say_not_logged_and_mfu_is_drawn_when_present(run_dir: Path, tmp_path: Path) -> None:
    new = ("tflops", "tokens_per_s_per_device", "mfu", "router_entropy", "idle_expert_frac")
    old = load_run(copy_run(run_dir, tmp_path / "old", edit=lambda r: {k: v for k, v in r.items() if k not in new}))
    texts = [t.get_text() for ax in draw_report([old]).axes for t in ax.texts]
    assert "mfu: not logged" in texts
    assert "router_entropy, idle_expert_frac: not logged" in texts
    null = load_run(copy_run(run_dir, tmp_path / "null", edit=lambda r: {**r, "mfu": None}))
    assert "mfu (no known peak: --peak-tflops): not logged" in [t.get_text() for t in draw_report([null]).axes[3].texts]

    def with_mfu(record: dict[str, Any]) -> dict[str, Any]:
        return {**record, "mfu": 0.25, "tokens_per_s_per_device": 100.0} if "loss" in record else record

    figure = draw_report([load_run(copy_run(run_dir, tmp_path / "mfu", edit=with_mfu))])
    mfu = [line for ax in figure.axes for line in ax.get_lines() if line.get_label() == "MFU"]
    assert len(mfu) == 1 and list(mfu[0].get_ydata()) == [25.0] * STEPS
    speed = [line for ax in figure.axes for line in ax.get_lines() if line.get_label() == "tokens/s per device"]
    assert len(speed) == 1 and list(speed[0].get_ydata()) == [100.0] * STEPS
    mixed = draw_report([old, load_run(tmp_path / "mfu")]).axes[3]  # an older run beside a newer one
    assert [line.get_label() for line in mixed.get_lines()] == ["old: tokens/s", "mfu: tokens/s per device"]


def test_compare_overlays_each_run_in_its_own_colour(run_dir: Path, tmp_path: Path, capsys: Any) -> None:
    def halved(record: dict[str, Any]) -> dict[str, Any]:
        return {**record, "loss": record["loss"] / 2, "lm_loss": record["lm_loss"] / 2} if "loss" in record else record

    other = copy_run(run_dir, tmp_path / "other", edit=halved)
    figure = draw_report([load_run(run_dir), load_run(other)])
    loss = figure.axes[[ax.get_title() for ax in figure.axes].index("Loss")]
    train = [line for line in loss.get_lines() if line.get_label().endswith(": train")]
    assert [line.get_label() for line in train] == ["shared: train", "other: train"]
    assert train[0].get_color() != train[1].get_color()
    assert list(train[1].get_ydata()) == pytest.approx([y / 2 for y in train[0].get_ydata()])

    output = tmp_path / "cmp.png"
    assert main(["report", str(run_dir), "--compare", str(other), "--output", str(output)]) == 0
    assert png_size(output) == (1600, 1000)
    assert f"wrote {output}" in capsys.readouterr().out


def test_a_torn_last_line_is_skipped(run_dir: Path, tmp_path: Path, capsys: Any) -> None:
    """A run killed mid-write leaves half a JSON object on the last line."""
    torn = tmp_path / "torn"
    torn.mkdir()
    text = (run_dir / "metrics.jsonl").read_text()
    (torn / "metrics.jsonl").write_text(text[: len(text) - 40])  # the eval record of the last step, cut
    run = load_run(torn)
    assert run.unreadable_lines == 1 and len(run.train) == STEPS and len(run.evals) == STEPS // EVERY - 1
    assert main(["report", str(torn)]) == 0
    assert png_size(torn / "report.png") == (1600, 1000)
    assert "1 unreadable line(s) skipped" in capsys.readouterr().out


def test_a_resumed_runs_later_records_replace_the_ones_from_its_checkpoint_on(tmp_path: Path) -> None:
    records = [{"step": s, "loss": 5.0 - s, "tokens": 100} for s in (1, 2, 3)]  # killed after step 3
    records += [{"step": s, "loss": 1.0, "tokens": 100} for s in (3, 4)]  # resumed from the checkpoint of step 2
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = load_run(tmp_path)
    assert [(r["step"], r["loss"]) for r in run.train] == [(1, 4.0), (2, 3.0), (3, 1.0), (4, 1.0)]
    assert run.tokens_at([4.0, 2.5, 6.0]) == [400.0, 250.0, 600.0]


def test_no_metrics_is_e307(tmp_path: Path, capsys: Any) -> None:
    assert main(["report", str(tmp_path / "missing")]) == 1
    assert "[E307]" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "eval_loss": 3.0}\n')  # no training record
    with pytest.raises(LuminaError, match="no complete training record") as info:
        load_run(tmp_path)
    assert info.value.code == "E307"


def test_a_failed_report_is_a_warning_and_never_fails_the_run(tmp_path: Path, capsys: Any) -> None:
    RunReport(tmp_path / "metrics.jsonl").on_train_end({})
    assert "warning: no run report" in capsys.readouterr().err
    assert not (tmp_path / "report.png").exists()


def test_several_runs_get_a_colour_each_and_one_run_a_colour_per_series(run_dir: Path) -> None:
    run = load_run(run_dir)
    figure = draw_report([run, RunMetrics("b", train=run.train)])
    routing = figure.axes[[ax.get_title() for ax in figure.axes].index("Routing and z-loss")]
    colours = {line.get_label(): line.get_color() for line in routing.get_lines()}
    assert colours["shared: aux loss"] == colours["shared: z-loss"] != colours["b: aux loss"]
    single = draw_report([run]).axes[4]
    assert len({line.get_color() for line in single.get_lines()}) == len(single.get_lines()) >= 2
