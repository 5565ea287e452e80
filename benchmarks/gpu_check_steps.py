"""The steps of benchmarks/gpu_check.sh that no other benchmark script does, and its summary.

    python benchmarks/gpu_check_steps.py validate -- train --preset debug ...   # parse + resolve a lumina-ds command
    python benchmarks/gpu_check_steps.py moe --output moe.json                 # grouped vs loop: equality and speed
    python benchmarks/gpu_check_steps.py memory --layout z3 --output mem.jsonl # memory model vs the allocator peak
    python benchmarks/gpu_check_steps.py report OUT_DIR                        # OUT_DIR/gpu_check.json and .md

`validate` is what a dry run (on a CPU) does with the steps only a GPU runs: the command goes through lumina-ds's own
parser and, for `train`, the whole config resolution, so a renamed flag or a bad value fails there.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lumina_ds.models import moe

HERE = Path(__file__).resolve().parent

# one GPU cannot run expert parallelism (EP needs a rank per expert group): the layouts vary ZeRO and recompute
LAYOUTS = {
    "z1": dict(zero=1, ckpt=False),
    "z2-recompute": dict(zero=2, ckpt=True),
    "z3": dict(zero=3, ckpt=False),
    "z3-recompute-bf16": dict(zero=3, ckpt=True, precision="mixed_bf16"),
}
MEMORY_STEPS = 3


def load_script(name: str) -> ModuleType:
    """Another benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"gpu_check_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def validate(argv: list[str]) -> None:
    """Parse lumina-ds command lines (separated by `---`) as the CLI does; for train, also resolve its RunConfig."""
    from lumina_ds.cli import parse
    from lumina_ds.cli.train import run_config_from_args

    commands: list[list[str]] = [[]]
    for word in argv:
        if word == "---":
            commands.append([])
        else:
            commands[-1].append(word)
    for command in filter(None, commands):
        args = parse(command)
        if args.command == "train":
            run = run_config_from_args(args)
            print(f"valid: train {args.experiment_name}: precision {run.train.precision}, "
                  f"ZeRO {run.distributed.zero_stage}, {run.train.max_steps} steps")  # fmt: skip
        else:
            print(f"valid: {' '.join(command[:1])}")


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    device = ids.device.type
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = model(ids, labels=ids, position_ids=positions)["loss"]
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss), grads


def _time_path(paths: ModuleType, args: argparse.Namespace, device: torch.device, path: str) -> dict[str, Any]:
    """The loss, gradients and step times of one expert path on the seeded model moe_paths.py builds."""
    moe.EXPERTS_PATH = path
    model = paths.build(args, device)
    ids = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    loss, grads = _loss_and_grads(model, ids.to(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    paths.train_step(model, optimizer, ids.to(device))  # warm-up
    syncs = paths.count_syncs(model, optimizer, ids.to(device))
    times = paths.time_steps(model, optimizer, ids.to(device), args.steps)
    return {"loss": loss, "grads": grads, "syncs_per_step": syncs, "step_ms": 1000 * statistics.median(times),
            "tokens_per_s": args.batch_size * args.seq_len / statistics.median(times)}  # fmt: skip


def moe_check(args: argparse.Namespace) -> dict[str, Any]:
    """Grouped GEMMs against the per-expert loop on the same weights and batch: loss and gradients, then speed."""
    paths = load_script("moe_paths")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        runs = {path: _time_path(paths, args, device, path) for path in ("grouped", "loop")}
    finally:
        moe.EXPERTS_PATH = "auto"
    grouped, loop = runs["grouped"], runs["loop"]
    grad_err = max((grouped["grads"][n] - g).norm().item() / max(g.norm().item(), 1e-12)
                   for n, g in loop["grads"].items())  # fmt: skip
    tolerance = 2e-2 if device.type == "cuda" else 1e-4  # bf16 autocast on a GPU, fp32 on a CPU
    probe = torch.zeros(1, args.hidden, device=device, dtype=torch.bfloat16 if device.type == "cuda" else None)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
        "loss_abs_diff": abs(grouped["loss"] - loop["loss"]),
        "grad_max_rel_err": grad_err,
        "tolerance": tolerance,
        "equal": abs(grouped["loss"] - loop["loss"]) <= tolerance and grad_err <= tolerance,
        "auto_picks": "grouped" if moe.use_grouped_mm(probe, widths=(args.expert_ffn, args.hidden)) else "loop",
        **{
            f"{path}_{key}": run[key]
            for path, run in runs.items()
            for key in ("step_ms", "tokens_per_s", "syncs_per_step")
        },
    }
    result["faster"] = "grouped" if result["grouped_step_ms"] < result["loop_step_ms"] else "loop"
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


def memory_case(layout: str, *, tiny: bool) -> Any:
    """memory_check.py's Case for one layout on one device: the ~57M MoE at 8 x 512 (debug at 2 x 64 when tiny)."""
    checks = load_script("memory_check")
    model, micro, seq = ("debug", 2, 64) if tiny else ("m57", 8, 512)
    return checks, checks.Case(model, 1, micro=micro, seq=seq, **LAYOUTS[layout])


def memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The memory model's prediction per layout; unless --validate-only, a real run's allocator peak beside it."""
    if len(args.layout) > 1 and not args.validate_only:
        raise SystemExit("measure one layout per process (each needs a fresh allocator peak)")
    rows = []
    for layout in args.layout:
        checks, case = memory_case(layout, tiny=args.tiny)
        checks.run_config(case)  # validates the layout as training would
        predicted = checks.predict(case, 1.0, backend="auto" if torch.cuda.is_available() else "sdpa")
        row: dict[str, Any] = {"layout": layout, "case": dataclasses.asdict(case)}
        row.update(predicted_bytes=predicted["overall"], predicted_states_bytes=predicted["states"])
        if not args.validate_only:
            row.update(measure_memory(checks, case, steps=1 if args.tiny else MEMORY_STEPS))
        rows.append(row)
        print(json.dumps(row))
    with open(args.output, "a", encoding="utf-8") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    return rows


def measure_memory(checks: ModuleType, case: Any, *, steps: int) -> dict[str, Any]:
    """A few DeepSpeed training steps in this process; the allocator's peak over them (None on a CPU)."""
    from lumina_ds.distributed.env import init_distributed
    from lumina_ds.training.engine import build_engine, build_model

    info = init_distributed()
    run = checks.run_config(case)
    cuda = info.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    torch.manual_seed(0)
    model = build_model(run, world_size=info.world_size, precision=case.precision)
    engine = build_engine(model, run, info=info, total_steps=steps, precision=case.precision).engine
    losses = []
    for step in range(steps):
        batch = checks.batch(case, run.model.vocab_size, step, micro=case.micro, seq=case.seq)
        ids, labels, pos = (t.to(info.device) for t in batch)
        out = engine(ids, labels=labels, position_ids=pos)
        engine.backward(out["loss"])
        engine.step()
        losses.append(out["loss"].item())
    measured = torch.cuda.max_memory_allocated() - base if cuda else None
    return {"measured_bytes": measured, "losses": losses, "device": str(info.device)}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def throughput_rows(out: Path) -> list[dict[str, Any]]:
    """Per configuration and implementation: tokens/s, TFLOP/s, MFU, peak memory; lumina's ratios to Mixtral."""
    rows = []
    for name in ("moe", "dense"):
        records = {r["impl"]: r for r in read_jsonl(out / f"throughput_{name}.jsonl")}
        peer = records.get("mixtral")
        for impl, r in records.items():
            row = {"config": name, "impl": impl, "params_total": r["params_total"], "tokens_per_s": r["tokens_per_s"],
                   "tflops": r["tflops"], "mfu": r["mfu"], "peak_mem_bytes": r["peak_mem_bytes"]}  # fmt: skip
            if impl == "lumina" and peer:
                row["speed_vs_mixtral"] = r["tokens_per_s"] / peer["tokens_per_s"]
                row["memory_vs_mixtral"] = r["peak_mem_bytes"] / max(peer["peak_mem_bytes"], 1)
            rows.append(row)
    return rows


def attention_summary(out: Path) -> list[dict[str, Any]]:
    """Per sequence length: flash-attn varlen's error against fp32 SDPA beside SDPA's own in the same precision;
    equal when flash's is at most twice SDPA's (both are rounding against one reference)."""
    records = read_jsonl(out / "attention.jsonl")
    rows = []
    for seq in dict.fromkeys(r["seq_len"] for r in records):
        by_path = {r["path"]: r for r in records if r["seq_len"] == seq}
        sdpa, flash = by_path.get("sdpa+mask", {}), by_path.get("flash-varlen", {})
        row: dict[str, Any] = {"seq_len": seq, "sdpa_err": sdpa.get("max_abs_err_out"),
                               "flash_err": flash.get("max_abs_err_out"), "skipped": flash.get("skipped")}  # fmt: skip
        if row["flash_err"] is not None and row["sdpa_err"] is not None:
            grads = flash.get("max_abs_err_grad"), sdpa.get("max_abs_err_grad")
            grad_ok = None in grads or grads[0] <= 2 * grads[1]
            row["equal"] = row["flash_err"] <= 2 * row["sdpa_err"] and grad_ok
            row["flash_tokens_per_s"], row["sdpa_tokens_per_s"] = flash["tokens_per_s"], sdpa["tokens_per_s"]
        rows.append(row)
    return rows


def fp16_summary(out: Path) -> dict[str, Any]:
    """The fp16 run's training records: how many steps, and whether every loss and gradient norm is finite."""
    records = [r for r in read_jsonl(out / "fp16.metrics.jsonl") if "loss" in r and "step" in r]
    if not records:
        return {"ran": False}
    values = [r[k] for r in records for k in ("loss", "grad_norm") if isinstance(r.get(k), (int, float))]
    last = records[-1]
    return {"ran": True, "last_step": last["step"], "records": len(records),
            "all_finite": all(math.isfinite(v) for v in values), "last_loss": last["loss"],
            "overflow_steps": last.get("overflow_steps"), "loss_scale": last.get("loss_scale")}  # fmt: skip


def refuses(code: str, argv: list[str], *, limit_s: float, out_dir: Path) -> dict[str, Any]:
    """Run `argv`; it must exit 1 with `[code]` within `limit_s`, writing nothing under `out_dir` (the launch gate's
    promise: a refusal before any tokenizer, data or model work). Raises SystemExit otherwise."""
    import subprocess
    import time

    start = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=limit_s)
    seconds = time.monotonic() - start
    written = sorted(str(p) for p in out_dir.rglob("*")) if out_dir.exists() else []
    row = {"code": code, "exit": done.returncode, "seconds": round(seconds, 1), "written": written,
           "message": next((line for line in done.stderr.splitlines() if f"[{code}]" in line), "")[:300]}  # fmt: skip
    print(json.dumps(row))
    if done.returncode != 1 or f"[{code}]" not in done.stderr or written:
        raise SystemExit(f"expected exit 1 with [{code}] and nothing written: {json.dumps(row)}")
    return row


def memory_rows(out: Path) -> list[dict[str, Any]]:
    rows = read_jsonl(out / "memory.jsonl")
    for row in rows:
        measured = row.get("measured_bytes")
        row["error"] = (row["predicted_bytes"] - measured) / measured if measured else None
    return rows


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else "-" if v is None else str(v)

    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(cell(v) for v in row) + " |" for row in rows
    ]


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"# GPU check ({summary['mode']})", ""]
    lines += _table(["step", "status", "s"], [[s["name"], s["status"], s["seconds"]] for s in summary["steps"]])
    lines += ["", "## Throughput, bf16 (against HF Mixtral in the same process)", ""]
    lines += _table(["config", "impl", "params", "tokens/s", "TFLOP/s", "MFU", "peak GiB", "speed vs Mixtral",
                     "memory vs Mixtral"],
                    [[r["config"], r["impl"], r["params_total"], r["tokens_per_s"], r["tflops"], r["mfu"],
                      r["peak_mem_bytes"] / 2**30, r.get("speed_vs_mixtral"), r.get("memory_vs_mixtral")]
                     for r in summary["throughput"]])  # fmt: skip
    lines += ["", "## flash-attn varlen against SDPA (document-masked packed rows, bf16; error vs fp32 SDPA)", ""]
    lines += _table(["S", "SDPA err", "flash err", "equal", "skipped"],
                    [[r["seq_len"], r["sdpa_err"], r["flash_err"], r.get("equal"), r["skipped"]]
                     for r in summary["attention"]])  # fmt: skip
    fp16 = summary["fp16"]
    lines += ["", f"## fp16 with loss scaling: {json.dumps(fp16)}", "", "## MoE experts: grouped GEMM against loop", ""]
    paths = summary["moe_paths"] or {}
    lines += _table(list(paths), [list(paths.values())]) if paths else ["not run"]
    lines += ["", "## Memory model against torch.cuda.max_memory_allocated (one GPU: EP 1)", ""]
    lines += _table(["layout", "predicted MiB", "measured MiB", "error"],
                    [[r["layout"], r["predicted_bytes"] / 2**20,
                      r["measured_bytes"] / 2**20 if r.get("measured_bytes") else None, r["error"]]
                     for r in summary["memory"]])  # fmt: skip
    return "\n".join(lines) + "\n"


def report(out_dir: str, *, dry_run: bool) -> dict[str, Any]:
    """Every step's status and numbers into OUT_DIR/gpu_check.json and the same as tables in gpu_check.md."""
    out = Path(out_dir)
    moe_file = out / "moe_paths.json"
    summary = {
        "mode": "dry run: CPU, tiny sizes" if dry_run else "GPU",
        "steps": read_jsonl(out / "steps.jsonl"),
        "throughput": throughput_rows(out),
        "attention": attention_summary(out),
        "fp16": fp16_summary(out),
        "moe_paths": json.loads(moe_file.read_text()) if moe_file.is_file() else None,
        "memory": memory_rows(out),
    }
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    (out / "gpu_check.md").write_text(markdown(summary))
    print((out / "gpu_check.md").read_text())
    return summary


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="parse and resolve a lumina-ds command line (after --)")
    v.add_argument("argv", nargs=argparse.REMAINDER)
    m = sub.add_parser("moe", help="grouped GEMM against the per-expert loop: equality and speed")
    for flag, default in (("hidden", 1024), ("layers", 8), ("experts", 8), ("expert-ffn", 2048), ("vocab", 32768),
                          ("batch-size", 8), ("seq-len", 2048), ("steps", 5)):  # fmt: skip
        m.add_argument(f"--{flag}", type=int, default=default)
    m.add_argument("--output", required=True)
    mem = sub.add_parser("memory", help="memory model against a real run's allocator peak, one layout")
    mem.add_argument("--layout", choices=list(LAYOUTS), action="append", required=True, help="repeatable")
    mem.add_argument("--tiny", action="store_true", help="the debug model at 2 x 64 (the dry run's size)")
    mem.add_argument("--validate-only", action="store_true", help="the prediction only, no run")
    mem.add_argument("--output", required=True, help="append the row here (JSON lines)")
    ref = sub.add_parser("refuses", help="a command (after --) must exit 1 with [CODE], leaving --output-dir empty")
    ref.add_argument("code")
    ref.add_argument("--limit-s", type=float, default=30.0)
    ref.add_argument("--output-dir", required=True, help="the command's output dir: must stay empty")
    ref.add_argument("argv", nargs=argparse.REMAINDER)
    r = sub.add_parser("report", help="OUT_DIR/gpu_check.json and gpu_check.md from the steps' outputs")
    r.add_argument("out_dir")
    r.add_argument("--dry-run", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "validate":
        validate(args.argv[1:] if args.argv[:1] == ["--"] else args.argv)
    elif args.command == "moe":
        moe_check(args)
    elif args.command == "memory":
        memory(args)
    elif args.command == "refuses":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        refuses(args.code, argv, limit_s=args.limit_s, out_dir=Path(args.output_dir))
    else:
        report(args.out_dir, dry_run=args.dry_run)


if __name__ == "__main__":
    main()
