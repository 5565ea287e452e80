"""Callbacks of the trainer (rank 0): they get plain dicts of metrics. MoESummary turns the model's tokens-per-expert
counters into balance figures before the loggers see the record."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from lumina_ds.errors import LuminaError


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """A failed write of a log file is one line with its code (E304), not a traceback out of a logger."""
    try:
        yield
    except OSError as exc:
        raise LuminaError(
            "E304",
            f"cannot write {path}: {exc.strerror or exc}",
            "free disk space in the output directory (checkpoints are verified and kept), then --auto-resume",
        ) from exc


class Callback:
    """Hooks the trainer calls on rank 0; override what you need."""

    def on_train_start(self, info: dict[str, Any]) -> None: ...

    def on_log(self, metrics: dict[str, Any]) -> None: ...

    def on_eval(self, metrics: dict[str, Any]) -> None: ...

    def on_step(self, step: int) -> None: ...

    def on_train_end(self, summary: dict[str, Any]) -> None: ...

    def close(self) -> None:
        """Release files and threads; called once the loop ends, however it ends (after on_train_end)."""


class MoESummary(Callback):
    """Adds `moe_balance`, `experts_used`, `num_experts` and per layer `idle_expert_frac` to records that carry
    `expert_counts` [layers, E], and `drop_rate` per layer to those that carry `tokens_dropped` [layers].

    Balance = mean over layers of the coefficient of variation of tokens per expert (0 = perfectly even); experts
    used = the fewest experts that received tokens in any layer; idle share = experts of a layer that received no
    token in the logging window; drop rate = routes dropped by the capacity limit over routes (tokens x top-k).
    With expert parallelism, `expert_rank_load`: the most tokens one rank's experts received over the mean per rank
    (`rank_load`, models/moe.py's rank_load_imbalance); once it passes `planned_load`, what the memory plan allowed,
    the run says so once on stderr. Give it before the loggers: it edits the record.
    """

    def __init__(self, *, expert_parallel_size: int = 1, planned_load: float = float("inf"),
                 rank_load: Callable[[list[list[float]], int], float] | None = None) -> None:  # fmt: skip
        self.expert_parallel_size, self.planned_load, self.rank_load = expert_parallel_size, planned_load, rank_load
        self.warned = False

    def on_log(self, metrics: dict[str, Any]) -> None:
        counts = metrics.get("expert_counts")
        if not counts:
            return
        per_layer = [[float(c) for c in layer] for layer in counts]
        if self.rank_load is not None and self.expert_parallel_size > 1:
            self.check_rank_load(metrics, self.rank_load(per_layer, self.expert_parallel_size))
        cvs = []
        for layer in per_layer:
            mean = sum(layer) / len(layer)
            std = math.sqrt(sum((c - mean) ** 2 for c in layer) / len(layer))
            cvs.append(std / max(mean, 1e-9))
        metrics.update(
            moe_balance=sum(cvs) / len(cvs),
            experts_used=min(sum(c > 0 for c in layer) for layer in per_layer),
            num_experts=len(per_layer[0]),
            idle_expert_frac=[sum(c == 0 for c in layer) / len(layer) for layer in per_layer],
        )
        dropped = metrics.get("tokens_dropped")
        if dropped is not None:
            routes = [sum(layer) for layer in per_layer]
            metrics["drop_rate"] = [d / max(r, 1.0) for d, r in zip(dropped, routes, strict=True)]

    def check_rank_load(self, metrics: dict[str, Any], load: float) -> None:
        metrics["expert_rank_load"] = load
        if load > self.planned_load and not self.warned:
            self.warned = True
            print(f"warning: at step {metrics.get('step')} one rank's experts received {load:.2f}x the mean load; "
                  f"the memory plan allows {self.planned_load:g}x (models/moe.py DROPLESS_IMBALANCE): raise "
                  "--load-balancing-weight or lower --micro-batch-size if memory runs short",
                  file=sys.stderr, flush=True)  # fmt: skip


def _fmt_int(x: float) -> str:
    return f"{x:,.0f}"


def format_log_line(m: dict[str, Any]) -> str:
    """The console block of the seed README: loss/ppl/lr, grad norm/throughput/memory, MoE balance."""
    lines = [
        f"Epoch {m['epoch']} | Step {m['step']:,}/{m['total_steps']:,} | {m['elapsed_s'] / 60:.1f} min elapsed"
        f" | ETA {m['eta_s'] / 60:.1f} min",
        f"Loss: {m['loss']:.6g} | LM Loss: {m['lm_loss']:.6g} | PPL: {m['ppl']:.2f} | LR: {m['lr']:.2e} | "
        f"β: {m['beta2']}",
        f"GradNorm: {m['grad_norm']:.4f} | Tokens/s: {_fmt_int(m['tokens_per_s'])}{_speed(m)} | Mem: {m['memory']}"
        f"{_loss_scale(m)}",
    ]
    if m.get("num_experts"):
        lines.append(
            f"MoE: Balance={m['moe_balance']:.3f} | Experts Used: {m['experts_used']}/{m['num_experts']}"
            f" | Routing Loss: {m['aux_loss']:.4f} | Z-Loss: {m['z_loss']:.4f}{_router_health(m)}"
        )
    return "\n".join(lines)


def _speed(m: dict[str, Any]) -> str:
    if "tflops" not in m:
        return ""
    mfu = f"{100 * m['mfu']:.1f}%" if m.get("mfu") is not None else "n/a (no known peak)"
    return f" ({_fmt_int(m['tokens_per_s_per_device'])}/device) | TFLOP/s: {m['tflops']:.3g} | MFU: {mfu}"


def _loss_scale(m: dict[str, Any]) -> str:
    """fp16 only: the dynamic loss scale and how many steps its overflows skipped so far (by design, no divergence)."""
    if "loss_scale" not in m:
        return ""
    return f" | Loss scale: {m['loss_scale']:g} ({m.get('overflow_steps', 0)} overflow steps)"


def _router_health(m: dict[str, Any]) -> str:
    """Per-layer figures as their mean over layers on the console (metrics.jsonl keeps the lists)."""
    text = ""
    if m.get("router_entropy"):
        text += f" | Entropy: {sum(m['router_entropy']) / len(m['router_entropy']):.3f} nats"
    if m.get("drop_rate"):
        text += f" | Dropped: {100 * sum(m['drop_rate']) / len(m['drop_rate']):.1f}%"
    return text


class ConsoleLogger(Callback):
    def __init__(self, *, progress_bar: bool = True, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout
        self.progress_bar = progress_bar and self.stream.isatty()
        self._bar: Any = None

    def on_train_start(self, info: dict[str, Any]) -> None:
        if self.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=info["total_steps"], initial=info["start_step"], unit="step", dynamic_ncols=True)

    def on_step(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, file=self.stream, flush=True)

    def on_log(self, metrics: dict[str, Any]) -> None:
        self._write(format_log_line(metrics))

    def on_eval(self, metrics: dict[str, Any]) -> None:
        best = metrics["best_eval_ppl"]
        self._write(
            f"Validation Loss: {metrics['eval_loss']:.4f} | PPL: {metrics['eval_ppl']:.2f} | "
            f"Best PPL: {best:.2f} @ step {metrics['best_step']:,} ({metrics['eval_tokens']:,} tokens)"
        )

    def on_train_end(self, summary: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.close()
        self._write("Training finished: " + ", ".join(f"{k}={v}" for k, v in summary.items()))


class JsonlLogger(Callback):
    """metrics.jsonl: one JSON object per logged step and per evaluation (appends, so resumes continue it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with writing(path):
            self.file = path.open("a", encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with writing(self.path):
            self.file.write(json.dumps(clean) + "\n")
            self.file.flush()

    def on_log(self, metrics: dict[str, Any]) -> None:
        self._write({k: v for k, v in metrics.items() if k not in ("memory", "total_steps", "beta2")})

    def on_eval(self, metrics: dict[str, Any]) -> None:
        self._write(metrics)

    def close(self) -> None:
        self.file.close()


SCALARS = ("loss", "lm_loss", "ppl", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "tflops", "mfu",
           "aux_loss", "z_loss", "moe_balance")  # fmt: skip
PER_LAYER = ("router_entropy", "idle_expert_frac", "tokens_dropped", "drop_rate")  # lists, one value per MoE layer


def train_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """What TensorBoard and W&B plot of a log record: `train/<name>`, and `router/<name>/moe_layer_<i>`."""
    out = {f"train/{key}": float(metrics[key]) for key in SCALARS if metrics.get(key) is not None}
    for name in PER_LAYER:
        for i, value in enumerate(metrics.get(name) or ()):
            out[f"router/{name}/moe_layer_{i}"] = float(value)
    return out


def eval_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {"eval/loss": float(metrics["eval_loss"]), "eval/ppl": float(metrics["eval_ppl"])}


class TensorBoardLogger(Callback):
    """The scalars of `train_scalars`/`eval_scalars`, and per MoE layer a histogram of expert load: bucket e (edges
    e - 0.5 .. e + 0.5) holds the tokens routed to expert e in the logging window."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        with writing(log_dir):
            self.writer = SummaryWriter(log_dir=str(log_dir))

    def on_log(self, metrics: dict[str, Any]) -> None:
        step = metrics["step"]
        with writing(self.log_dir):
            for tag, value in train_scalars(metrics).items():
                self.writer.add_scalar(tag, value, step)
            for i, layer in enumerate(metrics.get("expert_counts") or ()):
                self._expert_load(f"expert_load/moe_layer_{i}", [float(c) for c in layer], step)
            self.writer.flush()

    def _expert_load(self, tag: str, counts: list[float], step: int) -> None:
        experts = range(len(counts))
        self.writer.add_histogram_raw(
            tag,
            min=0,
            max=len(counts) - 1,
            num=sum(counts),
            sum=sum(e * c for e, c in zip(experts, counts, strict=True)),
            sum_squares=sum(e * e * c for e, c in zip(experts, counts, strict=True)),
            bucket_limits=[e + 0.5 for e in experts],
            bucket_counts=counts,
            global_step=step,
        )

    def on_eval(self, metrics: dict[str, Any]) -> None:
        with writing(self.log_dir):
            for tag, value in eval_scalars(metrics).items():
                self.writer.add_scalar(tag, value, metrics["step"])
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()
