"""The run report: one PNG of a run's metrics.jsonl (loss, learning rate, gradient norm, speed, routing, expert load),
drawn by `lumina-ds report` and by training at its end. Other runs can be overlaid (`--compare`).

matplotlib is imported inside the drawing functions, so that importing this module (the trainer's callbacks, the CLI)
stays light.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lumina_ds.errors import LuminaError
from lumina_ds.monitor.callbacks import Callback

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

METRICS_FILE = "metrics.jsonl"  # run_dir.METRICS_FILE (run_dir imports torch, which a light command must not)
REPORT_FILE = "report.png"
FIGURE_INCHES, DPI = (16.0, 10.0), 100  # 1600 x 1000 pixels
TITLES = ("Loss", "Learning rate", "Gradient norm", "Tokens/s and MFU", "Routing and z-loss", "Expert load")
PER_LAYER_ROUTING = (  # lists with one value per MoE layer, drawn as their mean over layers
    ("router_entropy", "router entropy (nats, layer mean)"),
    ("idle_expert_frac", "idle experts (share, layer mean)"),
    ("drop_rate", "dropped tokens (share, layer mean)"),
)
LINE_STYLES = ("-", "--", ":", "-.")
LOAD_CEILING = 2.0  # heatmap colours saturate at twice an even share
# fixed margins: a layout engine costs a quarter of a second per report, paid at the end of every run
MARGINS = {"left": 0.05, "right": 0.93, "bottom": 0.06, "top": 0.92, "wspace": 0.3, "hspace": 0.42}


@dataclass
class RunMetrics:
    """One run's records: training log records and evaluation records, each in step order."""

    label: str
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    unreadable_lines: int = 0

    def tokens_at(self, steps: Sequence[float]) -> list[float]:
        """Training tokens seen up to each step: the logged windows' `tokens`, summed and interpolated."""
        known = [(0.0, 0.0)]
        for record in self.train:
            known.append((float(record["step"]), known[-1][1] + float(record.get("tokens") or 0)))
        per_step = known[-1][1] / max(known[-1][0], 1.0)
        return [_interpolate(known, float(step), per_step) for step in steps]


def _interpolate(known: list[tuple[float, float]], x: float, slope_after: float) -> float:
    for (x0, y0), (x1, y1) in itertools.pairwise(known):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1e-9)
    return known[-1][1] + (x - known[-1][0]) * slope_after


def _append_in_step_order(records: list[dict[str, Any]], record: dict[str, Any]) -> None:
    """A step at or below the last one means the run resumed (or rewound) there: the later records replace the
    earlier ones from that step on."""
    while records and records[-1]["step"] >= record["step"]:
        records.pop()
    records.append(record)


def metrics_path(run: str | Path) -> Path:
    """A run directory or its metrics.jsonl -> the metrics file (E307 when there is none)."""
    path = Path(run)
    path = path / METRICS_FILE if path.is_dir() else path
    if not path.is_file():
        raise LuminaError(
            "E307",
            f"no metrics to draw: {path} does not exist",
            "pass a run directory (<output-dir>/<experiment-name>) or its metrics.jsonl",
        )
    return path


def load_run(run: str | Path, *, label: str | None = None) -> RunMetrics:
    """Read a run's metrics.jsonl; unreadable lines (the torn last line of a killed run) are skipped and counted."""
    path = metrics_path(run)
    metrics = RunMetrics(label or (path.parent.name if path.name == METRICS_FILE else path.stem))
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            metrics.unreadable_lines += 1
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            metrics.unreadable_lines += 1
        elif record.get("eval_loss") is not None:
            _append_in_step_order(metrics.evals, record)
        elif record.get("loss") is not None:
            _append_in_step_order(metrics.train, record)
    if not metrics.train:
        raise LuminaError(
            "E307",
            f"no metrics to draw: {path} holds no complete training record",
            "the run stopped before its first log line; train longer or lower --log-every-n-steps",
        )
    return metrics


# ---- drawing ---------------------------------------------------------------------------------------


def _series(run: RunMetrics, key: str, *, reduce_layers: bool = False) -> tuple[list[float], list[float]]:
    """(steps, values) of the training records that carry `key` (a per-layer list is averaged when asked)."""
    steps, values = [], []
    for record in run.train:
        value = record.get(key)
        if reduce_layers and isinstance(value, list):
            value = sum(value) / len(value) if value else None
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(float(record["step"]))
            values.append(float(value))
    return steps, values


def _style(run_index: int, series_index: int, runs: int) -> dict[str, Any]:
    """One run: a colour per series. Several: a colour per run and a line style per series."""
    if runs == 1:
        return {"color": f"C{series_index}", "linestyle": "-"}
    return {"color": f"C{run_index}", "linestyle": LINE_STYLES[series_index % len(LINE_STYLES)]}


def _label(run: RunMetrics, name: str, runs: int) -> str:
    return name if runs == 1 else f"{run.label}: {name}"


def _not_logged(ax: Axes, names: Sequence[str]) -> None:
    box = {"facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"}  # readable over the lines behind it
    ax.text(0.5, 0.04, f"{', '.join(names)}: not logged", transform=ax.transAxes, ha="center", va="bottom",
            color="0.3", bbox=box, zorder=5)  # fmt: skip


def _draw_lines(ax: Axes, runs: Sequence[RunMetrics], keys: Sequence[tuple[str, str]], *, reduce_layers: bool = False,
                start: int = 0) -> list[str]:  # fmt: skip
    """Plot each (key, name) of each run against step; the names that no run logged."""
    missing = []
    for series, (key, name) in enumerate(keys, start=start):
        drawn = False
        for index, run in enumerate(runs):
            steps, values = _series(run, key, reduce_layers=reduce_layers)
            if values:
                ax.plot(steps, values, label=_label(run, name, len(runs)), **_style(index, series, len(runs)))
                drawn = True
        if not drawn:
            missing.append(key)
    return missing


def _finish_axes(ax: Axes, *, xlabel: str = "step", missing: Sequence[str] = ()) -> None:
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if missing:
        _not_logged(ax, missing)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="best")


def draw_loss(ax: Axes, runs: Sequence[RunMetrics]) -> None:
    """Training LM loss (the loss evaluation measures too) and evaluation loss against training tokens."""
    for index, run in enumerate(runs):
        key = "lm_loss" if any(r.get("lm_loss") is not None for r in run.train) else "loss"
        steps, values = _series(run, key)
        ax.plot(run.tokens_at(steps), values, label=_label(run, "train", len(runs)), **_style(index, 0, len(runs)))
        if run.evals:
            tokens = run.tokens_at([float(r["step"]) for r in run.evals])
            ax.plot(tokens, [r["eval_loss"] for r in run.evals], marker="o", label=_label(run, "eval", len(runs)),
                    **_style(index, 1, len(runs)))  # fmt: skip
    ax.set_ylabel("loss (nats)")
    _finish_axes(ax, xlabel="training tokens")


def draw_throughput(ax: Axes, runs: Sequence[RunMetrics]) -> None:
    """Tokens/s per device where logged (else all ranks' tokens/s) on the left, MFU in percent on the right."""
    names = set()
    for index, run in enumerate(runs):  # per run: an older run logged all ranks' tokens/s only
        key, name = "tokens_per_s_per_device", "tokens/s per device"
        if not _series(run, key)[1]:
            key, name = "tokens_per_s", "tokens/s"
        steps, values = _series(run, key)
        if values:
            ax.plot(steps, values, label=_label(run, name, len(runs)), **_style(index, 0, len(runs)))
            names.add(name)
    ax.set_ylabel(" or ".join(sorted(names)))
    missing = [] if names else ["tokens_per_s"]
    mfu = [(index, run, *_series(run, "mfu")) for index, run in enumerate(runs)]
    if not any(values for *_, values in mfu):
        null = any("mfu" in record for run in runs for record in run.train)  # no known peak: a CPU, say
        _finish_axes(ax, missing=[*missing, "mfu (no known peak: --peak-tflops)" if null else "mfu"])
        return
    right = ax.twinx()
    for index, run, steps, values in mfu:
        if values:
            right.plot(steps, [100 * v for v in values], label=_label(run, "MFU", len(runs)),
                       **_style(index, 1, len(runs)))  # fmt: skip
    right.set_ylabel("MFU (%)")
    _finish_axes(ax, missing=missing)
    handles, labels = ax.get_legend_handles_labels()
    more_handles, more_labels = right.get_legend_handles_labels()
    ax.legend(handles + more_handles, labels + more_labels, fontsize="small", loc="best")


def draw_routing(ax: Axes, runs: Sequence[RunMetrics]) -> None:
    """Router losses and health: per-layer lists (entropy, idle experts, drop rate) are averaged over layers."""
    missing = _draw_lines(ax, runs, [("aux_loss", "aux loss"), ("z_loss", "z-loss")])
    missing += _draw_lines(ax, runs, PER_LAYER_ROUTING, reduce_layers=True, start=2)
    if "drop_rate" in missing:  # logged by the native backend only: its absence elsewhere is expected
        missing.remove("drop_rate")
    _finish_axes(ax, missing=missing)


def expert_load(run: RunMetrics) -> tuple[list[list[float]], list[float], int, int]:
    """(rows: one per (layer, expert), layer-major; columns: logged steps), steps, layers, experts.

    Each value is the expert's share of its layer's tokens over the logging window times the number of experts:
    1 is an even share, 0 an idle expert, 2 twice its share.
    """
    records = [r for r in run.train if r.get("expert_counts")]
    if not records:
        return [], [], 0, 0
    layers, experts = len(records[0]["expert_counts"]), len(records[0]["expert_counts"][0])
    records = [r for r in records if len(r["expert_counts"]) == layers and len(r["expert_counts"][0]) == experts]
    rows = [[0.0] * len(records) for _ in range(layers * experts)]
    for column, record in enumerate(records):
        for layer, counts in enumerate(record["expert_counts"]):
            total = float(sum(counts)) or 1.0
            for expert, count in enumerate(counts):
                rows[layer * experts + expert][column] = experts * float(count) / total
    return rows, [float(r["step"]) for r in records], layers, experts


def draw_expert_load(ax: Axes, run: RunMetrics, figure: Figure) -> None:
    """One image: a row per (layer, expert) grouped by layer, a column per logged step, coloured by load."""
    rows, steps, layers, experts = expert_load(run)
    ax.set_xlabel("step")
    if not rows:
        _not_logged(ax, ["expert_counts"])
        return
    first, last = steps[0], steps[-1]
    half = (last - first) / max(len(steps) - 1, 1) / 2 or 0.5
    image = ax.imshow(rows, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=0.0, vmax=LOAD_CEILING,
                      extent=(first - half, last + half, layers * experts, 0))  # fmt: skip
    for layer in range(1, layers):
        ax.axhline(layer * experts, color="black", linewidth=0.8)
    every = max(1, math.ceil(layers / 16))  # at most 16 layer labels
    ax.set_yticks([(layer + 0.5) * experts for layer in range(0, layers, every)])
    ax.set_yticklabels([f"layer {layer}" for layer in range(0, layers, every)])
    ax.set_ylabel(f"{experts} experts per layer")
    colorbar = figure.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    colorbar.set_label("tokens / even share (0 = idle)")


def draw_report(runs: Sequence[RunMetrics]) -> Figure:
    """The report figure: six panels (TITLES); every run overlaid in the line panels, the first run's expert load."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    assert runs, "at least one run"
    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(3, 2, gridspec_kw=MARGINS).flatten()
    for ax, title in zip(axes, TITLES, strict=True):
        ax.set_title(title)
    draw_loss(axes[0], runs)
    axes[1].set_ylabel("learning rate")
    _finish_axes(axes[1], missing=_draw_lines(axes[1], runs, [("lr", "learning rate")]))
    _finish_axes(axes[2], missing=_draw_lines(axes[2], runs, [("grad_norm", "gradient norm")]))
    draw_throughput(axes[3], runs)
    draw_routing(axes[4], runs)
    draw_expert_load(axes[5], runs[0], figure)
    if len(runs) > 1:
        axes[5].set_title(f"Expert load ({runs[0].label})")
    last = max(int(run.train[-1]["step"]) for run in runs)
    figure.suptitle(f"{' vs '.join(run.label for run in runs)} — up to step {last:,}")
    return figure


def write_report(runs: Sequence[RunMetrics], output: str | Path) -> Path:
    """Draw the report and save it as a PNG (written beside, then renamed: a reader never sees half a file)."""
    output = Path(output)
    figure = draw_report(runs)
    partial = output.with_name(output.name + ".partial")
    figure.savefig(partial, format="png", dpi=DPI)
    partial.replace(output)
    return output


class RunReport(Callback):
    """Writes report.png into the run directory when training ends (signal stops too); a failure is a warning."""

    def __init__(self, metrics_file: Path) -> None:
        self.metrics_file = metrics_file

    def on_train_end(self, summary: dict[str, Any]) -> None:
        output = self.metrics_file.with_name(REPORT_FILE)
        try:
            write_report([load_run(self.metrics_file)], output)
        except Exception as exc:  # the run's result matters more than its picture
            print(f"warning: no run report ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
            return
        print(f"run report: {output}", flush=True)
