"""`--profile-training` and `--profile-memory`: callbacks of rank 0 that look inside a few training steps.

TrainingProfiler runs torch.profiler over WAIT_STEPS + WARMUP_STEPS + N steps and writes a Chrome trace and the top
operators by self time. PhaseMemory measures the peak memory of forward, backward and the optimizer step (peak RSS on
a CPU, peak allocated on a GPU) and, on a GPU, also records a CUDA memory snapshot for pytorch.org/memory_viz.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lumina_ds.config.run import LoggingConfig
from lumina_ds.monitor.callbacks import Callback, writing
from lumina_ds.training.train_module import TrainModule

PROFILE_DIR = "profile"
TRACE_FILE = "trace.json"
TOP_OPS_FILE = "top_ops.txt"
MEMORY_FILE = "memory.json"
SNAPSHOT_FILE = "memory_snapshot.pickle"
WAIT_STEPS = 1  # the first step builds caches and allocator pools: not what a run spends its time on
WARMUP_STEPS = 1  # the profiler's own start-up cost lands here, outside the recorded steps
TOP_OPS = 20
SNAPSHOT_STEPS = 3  # steps of allocation history in the CUDA snapshot (it grows with every allocation)
SNAPSHOT_MAX_ENTRIES = 200_000
PHASES = ("forward", "backward", "optimizer_step")


def top_ops_table(profiler: torch.profiler.profile, *, device: bool, limit: int = TOP_OPS) -> str:
    """The `limit` operators with the most self time (device self time when `device`), as a text table."""
    events = profiler.key_averages()
    attr = "self_device_time_total" if device else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    top = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:limit]
    where = "CUDA" if device else "CPU"
    header = f"{'operator':<48} {'self ms':>10} {'share':>7} {'calls':>7}"
    lines = [f"top {len(top)} operators by {where} self time", header]
    for event in top:
        self_us = getattr(event, attr)
        lines.append(f"{event.key[:48]:<48} {self_us / 1e3:>10.2f} {self_us / total:>7.1%} {event.count:>7}")
    return "\n".join(lines)


class TrainingProfiler(Callback):
    """torch.profiler over `active_steps` training steps after WAIT_STEPS + WARMUP_STEPS; writes `trace.json` (open it
    in chrome://tracing or ui.perfetto.dev) and `top_ops.txt` into out_dir, and prints the table."""

    def __init__(self, out_dir: Path, *, active_steps: int, cuda: bool) -> None:
        assert active_steps >= 1
        self.out_dir = out_dir
        self.active_steps = active_steps
        self.cuda = cuda
        self.profiler: torch.profiler.profile | None = None
        self.steps_done = 0
        self.written = False

    def on_train_start(self, info: dict[str, Any]) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        schedule = torch.profiler.schedule(wait=WAIT_STEPS, warmup=WARMUP_STEPS, active=self.active_steps, repeat=1)
        self.profiler = torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=self._ready)
        self.profiler.start()

    def on_step(self, step: int) -> None:
        if self.profiler is None:
            return
        self.steps_done += 1
        self.profiler.step()
        if self.written:  # the schedule is done: stop paying for the profiler
            self._stop()

    def on_train_end(self, summary: dict[str, Any]) -> None:
        self._stop()  # a run shorter than the schedule writes what the active steps it reached recorded
        if not self.written:
            print(f"profile: the run ended within the {WAIT_STEPS + WARMUP_STEPS} wait/warm-up steps; nothing recorded")

    def _stop(self) -> None:
        if self.profiler is not None:
            profiler, self.profiler = self.profiler, None
            profiler.stop()

    def _ready(self, profiler: torch.profiler.profile) -> None:
        recorded = min(self.steps_done - WAIT_STEPS - WARMUP_STEPS, self.active_steps)
        if recorded < 1:  # stopped right after the warm-up: the open window holds no training step
            return
        with writing(self.out_dir):
            self.out_dir.mkdir(parents=True, exist_ok=True)
            profiler.export_chrome_trace(str(self.out_dir / TRACE_FILE))
            table = top_ops_table(profiler, device=self.cuda)
            (self.out_dir / TOP_OPS_FILE).write_text(table + "\n")
        self.written = True
        print(f"profile of {recorded} step(s) -> {self.out_dir / TRACE_FILE}\n{table}", flush=True)


def _read_peak_rss() -> int:
    """This process's peak resident set since the last reset (VmHWM), in bytes."""
    match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    assert match is not None, "no VmHWM in /proc/self/status"
    return int(match.group(1)) * 1024


def _reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM to the current RSS (proc(5)), so each phase gets its own peak
    Path("/proc/self/clear_refs").write_text("5")


def _rss_now() -> int:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
    assert match is not None
    return int(match.group(1)) * 1024


class PhaseMemory(Callback):
    """Peak memory of forward, backward and optimizer step, the maximum over the run's steps.

    On a CPU the peak RSS of the process (its high-water mark reset before each phase); on a GPU the peak allocated
    bytes (torch.cuda peak stats reset before each phase), plus a CUDA memory snapshot of the first SNAPSHOT_STEPS
    steps. Install with `wrap(module)` before training.
    """

    def __init__(self, out_dir: Path, *, cuda: bool) -> None:
        self.out_dir = out_dir
        self.cuda = cuda
        self.peaks: dict[str, int] = {}
        self.before: dict[str, int] = {}
        self.recording = False

    def wrap(self, module: TrainModule) -> None:
        """Measure around the train module's forward, backward and optimizer step (training only, not evaluation)."""
        module.wrap_phases(self._measured)

    def _measured(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def measured(*args: Any, **kwargs: Any) -> Any:
            before = self._reset()
            result = fn(*args, **kwargs)
            peak = self._peak()
            if peak > self.peaks.get(phase, -1):
                self.peaks[phase], self.before[phase] = peak, before
            return result

        return measured

    def _reset(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return int(torch.cuda.memory_allocated())
        _reset_peak_rss()
        return _rss_now()

    def _peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        return _read_peak_rss()

    def on_train_start(self, info: dict[str, Any]) -> None:
        if self.cuda:
            torch.cuda.memory._record_memory_history(max_entries=SNAPSHOT_MAX_ENTRIES)
            self.recording = True

    def on_step(self, step: int) -> None:
        if self.recording and step >= SNAPSHOT_STEPS:
            self._dump_snapshot()

    def _dump_snapshot(self) -> None:
        with writing(self.out_dir):
            self.out_dir.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(self.out_dir / SNAPSHOT_FILE))
        torch.cuda.memory._record_memory_history(enabled=None)
        self.recording = False
        print(f"CUDA memory snapshot -> {self.out_dir / SNAPSHOT_FILE} (drag it onto pytorch.org/memory_viz)")

    def report(self) -> dict[str, Any]:
        measure = "peak_allocated" if self.cuda else "peak_rss"
        phases = {p: {f"{measure}_bytes": self.peaks[p], "at_start_bytes": self.before[p],
                      "increase_bytes": self.peaks[p] - self.before[p]} for p in PHASES if p in self.peaks}  # fmt: skip
        return {"device": "cuda" if self.cuda else "cpu", "measure": measure, "phases": phases}

    def on_train_end(self, summary: dict[str, Any]) -> None:
        if self.recording:
            self._dump_snapshot()
        report = self.report()
        with writing(self.out_dir):
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / MEMORY_FILE).write_text(json.dumps(report, indent=2) + "\n")
        print(format_memory(report), flush=True)


def format_memory(report: dict[str, Any]) -> str:
    """One line per phase: peak and growth within the phase, in MiB."""
    lines = [f"memory per phase ({report['measure'].replace('_', ' ')}, max over steps):"]
    for phase, row in report["phases"].items():
        peak = next(v for k, v in row.items() if k.startswith("peak"))
        lines.append(f"  {phase:<15} peak {peak / 2**20:9.1f} MiB   +{row['increase_bytes'] / 2**20:8.1f} MiB in it")
    return "\n".join(lines)


def profiling_callbacks(logging: LoggingConfig, *, module: TrainModule) -> list[Callback]:
    """The profilers a run asked for, measuring `module` in this process."""
    out_dir = logging.run_dir / PROFILE_DIR
    cuda = module.engine.device.type == "cuda"
    callbacks: list[Callback] = []
    if logging.profile_training:
        callbacks.append(TrainingProfiler(out_dir, active_steps=logging.profile_training, cuda=cuda))
    if logging.profile_memory:
        memory = PhaseMemory(out_dir, cuda=cuda)
        memory.wrap(module)
        callbacks.append(memory)
    return callbacks
