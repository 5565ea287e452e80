"""Document-masked attention paths side by side: exactness against fp32 SDPA and speed, on packed rows.

For each available path (sdpa+mask: dense [B,1,S,S] bool mask; flex: flex_attention BlockMask, compiled on CUDA;
flash-varlen: flash_attn_varlen_func over cu_seqlens, CUDA fp16/bf16 with flash-attn installed), each precision and
each sequence length: the same seeded q/k/v (GQA) and position_ids with ~--docs documents per row plus a little
trailing padding, built exactly as lumina_ds.models.attention builds them for the model. Reported: max |error| of the
output (and of dq/dk/dv where backward runs) against SDPA with the dense mask in fp32 on the same inputs; median time
of mask build + forward (+ backward on CUDA; flex has no CPU backward, so CPU rows are forward-only); tokens/s;
peak extra memory (torch.cuda.max_memory_allocated over the inputs; n/a on CPU). The `sdpa-causal` row ignores the
documents (plain causal, fused kernel) and is a speed reference only. A table goes to stdout, one JSON object per row
is appended to --output (JSON lines).

    python benchmarks/attention_check.py                          # GPU: S=2048,4096, fp32 and bf16
    python benchmarks/attention_check.py --seq-lens 64 --batch-size 2 --heads 4 --kv-heads 2 --head-dim 16 \
        --steps 2 --warmup 1                                      # CPU smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import lumina_ds.models.attention as attention
from lumina_ds.models.attention import DocumentMask, build_document_mask

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
Tensors = tuple[torch.Tensor, ...]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", default="2048,4096", help="comma list of row lengths S")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--docs", type=int, default=4, help="documents per row (their lengths are random)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of: fp32, bf16")
    p.add_argument("--paths", default="sdpa-causal,sdpa+mask,flex,flash-varlen", help="comma list; unavailable skip")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (flex compiles here on CUDA)")
    p.add_argument("--output", default=None, help="append one JSON line per result to this file")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: os.cpu_count())")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def packed_positions(batch: int, seq: int, docs: int, gen: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    """-> ([B, S] position_ids, tokens in documents per row): `docs` documents of random length, then up to S/16
    padding tokens with position 0 (as lumina_ds.data.loading.packing pads)."""
    rows, used_per_row = [], []
    for _ in range(batch):
        used = seq - int(torch.randint(0, seq // 16 + 1, (1,), generator=gen))
        cuts = torch.randperm(used - 1, generator=gen)[: docs - 1].add(1).sort().values.tolist()
        bounds = [0, *cuts, used]
        row = [torch.arange(b - a) for a, b in itertools.pairwise(bounds)]
        rows.append(torch.cat([*row, torch.zeros(seq - used, dtype=torch.long)]))
        used_per_row.append(used)
    return torch.stack(rows), used_per_row


def make_inputs(args: argparse.Namespace, seq: int, device: torch.device) -> tuple[Tensors, torch.Tensor]:
    """fp32 (q [B, nh, S, hd], k, v [B, nkv, S, hd], dout [B, nh, S, hd]) and position_ids [B, S], seeded."""
    gen = torch.Generator().manual_seed(args.seed + seq)
    B, hd = args.batch_size, args.head_dim
    shapes = [(B, args.heads, seq, hd), (B, args.kv_heads, seq, hd), (B, args.kv_heads, seq, hd)]
    q, k, v, dout = (torch.randn(s, generator=gen).to(device) for s in [*shapes, shapes[0]])
    pos, _ = packed_positions(B, seq, args.docs, gen)
    return (q, k, v, dout), pos.to(device)


def attend(path: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask | None) -> torch.Tensor:
    """-> [B, nh, S, hd] by one path, through the functions lumina_ds.models.attention.Attention dispatches to."""
    if path == "flash-varlen":
        assert mask is not None
        return attention.flash_varlen_attention(q, k, v, mask).transpose(1, 2)
    if path == "flex":
        assert mask is not None and mask.block_mask is not None
        return attention.flex_document_attention(q, k, v, mask.block_mask)
    dense = mask.dense if mask is not None else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, is_causal=dense is None, enable_gqa=True)


def mask_backend(path: str) -> str | None:
    return {"sdpa+mask": "sdpa", "flex": "flex", "flash-varlen": "flash"}.get(path)


def unavailable(path: str, precision: str, device: torch.device) -> str | None:
    """Why `path` cannot run here, or None."""
    if path == "flex" and not attention.FLEX_ATTENTION_AVAILABLE:
        return f"torch {torch.__version__} has no flex_attention"
    if path == "flash-varlen":
        return attention.flash_unusable(device, torch.float32 if precision == "fp32" else torch.bfloat16)
    return None


def run_once(path: str, inputs: Tensors, pos: torch.Tensor, backward: bool) -> Tensors:
    """Mask build + forward (+ backward): what one training step's attention costs. -> (out, dq, dk, dv)."""
    q, k, v = (t.detach().requires_grad_(backward) for t in inputs[:3])
    dout = inputs[3]
    backend = mask_backend(path)
    mask = build_document_mask(pos, backend) if backend else None
    out = attend(path, q, k, v, mask)
    if not backward:
        return (out.detach(),)
    out.backward(dout)
    assert q.grad is not None and k.grad is not None and v.grad is not None
    return out.detach(), q.grad, k.grad, v.grad


def max_errors(got: Tensors, ref: Tensors) -> tuple[float, float | None]:
    """(max |out - ref|, max over dq/dk/dv of |grad - ref|) in fp32."""
    out_err = float((got[0].float() - ref[0]).abs().max())
    grad_err = (
        max(float((g.float() - r).abs().max()) for g, r in zip(got[1:], ref[1:], strict=True)) if got[1:] else None
    )
    return out_err, grad_err


def timed(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> tuple[list[float], int | None]:
    """(seconds of each post-warm-up call, peak extra CUDA bytes over what was allocated before)."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, (torch.cuda.max_memory_allocated() - before) if cuda else None


def measure(path: str, precision: str, seq: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One row of the table: exactness against fp32 SDPA with the dense mask, then timing and memory."""
    record: dict[str, Any] = {"path": path, "precision": precision, "seq_len": seq, "batch_size": args.batch_size}
    reason = unavailable(path, precision, device)
    if reason:
        return {**record, "skipped": reason}
    inputs, pos = make_inputs(args, seq, device)
    backward = device.type == "cuda"  # flex_attention has no CPU backward; keep CPU rows comparable (forward only)
    ref = run_once("sdpa+mask", inputs, pos, backward)
    cast = tuple(t.to(DTYPES[precision]) for t in inputs)
    out_err, grad_err = max_errors(run_once(path, cast, pos, backward), ref) if path != "sdpa-causal" else (None, None)
    del ref
    times, peak = timed(lambda: run_once(path, cast, pos, backward), args.steps, args.warmup, device)
    median = statistics.median(times)
    return {
        **record,
        "pass": "fwd+bwd" if backward else "fwd",
        "docs_per_row": args.docs,
        "sequences_per_row": float((pos == 0).sum() / args.batch_size),  # documents + one-token padding runs
        "max_abs_err_out": out_err,
        "max_abs_err_grad": grad_err,
        "ms_median": 1e3 * median,
        "ms_min": 1e3 * min(times),
        "tokens_per_s": args.batch_size * seq / median,
        "peak_extra_bytes": peak,
    }


def environment(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": name,
        "torch": torch.__version__,
        "flash_attn": attention.flash_attn_status().detail,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "config": {
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "docs": args.docs,
            "steps": args.steps,
            "warmup": args.warmup,
            "seed": args.seed,
        },
    }


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: list[dict[str, Any]]) -> str:
    head = ("path", "prec", "S", "pass", "tokens/s", "ms med [min]", "max|err| out", "max|err| grad", "peak extra")
    rows = [head]
    for r in results:
        if "skipped" in r:
            rows.append((r["path"], r["precision"], str(r["seq_len"]), "skipped", *("-",) * 5))
            continue
        peak = r["peak_extra_bytes"]
        rows.append((
            r["path"], r["precision"], str(r["seq_len"]), r["pass"], f"{r['tokens_per_s']:,.0f}",
            f"{r['ms_median']:.2f} [{r['ms_min']:.2f}]", fmt(r["max_abs_err_out"], ".2e"),
            fmt(r["max_abs_err_grad"], ".2e"), "n/a" if peak is None else f"{peak / 2**20:.1f} MiB",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def report(results: list[dict[str, Any]], env: dict[str, Any], args: argparse.Namespace) -> None:
    cfg = env["config"]
    print(
        f"device: {env['device']} | torch {env['torch']} | flash-attn {env['flash_attn']} | "
        f"threads {env['threads']} | batch {args.batch_size} | heads {cfg['heads']}/{cfg['kv_heads']} kv | "
        f"head_dim {cfg['head_dim']} | {cfg['docs']} docs/row | {cfg['steps']} steps, {cfg['warmup']} warm-up"
    )
    print(format_table(results))
    for reason in dict.fromkeys(
        f"skipped {r['path']} {r['precision']}: {r['skipped']}" for r in results if "skipped" in r
    ):
        print(reason)
    print("note: err = max |x - x_ref|, x_ref = SDPA with the dense document mask in fp32 on the same inputs; "
          "time = mask build + attention (+ backward); sdpa-causal ignores documents (speed reference)")  # fmt: skip
    if args.output:
        with open(args.output, "a", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps({**env, **r}) + "\n")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    known = {"sdpa-causal", "sdpa+mask", "flex", "flash-varlen"}
    if set(paths) - known or set(precisions) - set(DTYPES):
        raise SystemExit(f"paths must be in {sorted(known)}, precisions in {sorted(DTYPES)}")
    env = environment(args, device)
    results = [
        measure(path, precision, int(seq), args, device)
        for seq in args.seq_lens.split(",")
        for precision in precisions
        for path in paths
    ]
    report(results, env, args)
    return [{**env, **r} for r in results]


if __name__ == "__main__":
    main(sys.argv[1:])
