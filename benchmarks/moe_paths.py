"""Host syncs and step time of the MoE experts' two paths: grouped GEMMs (`torch._grouped_mm`) and the per-expert loop.

On CUDA, each training step (forward, backward, AdamW) runs once under `torch.cuda.set_sync_debug_mode("warn")` and
every synchronizing call is counted; then steps are timed with CUDA events. On a CPU only the times are measured.

    python benchmarks/moe_paths.py                         # 491M MoE, bf16 on a GPU (fp32 on a CPU), 8 x 2048
    python benchmarks/moe_paths.py --hidden 256 --layers 2 --experts 8 --vocab 8192 --batch-size 4 --seq-len 256
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lumina_ds.models import moe
from lumina_ds.models.config import ModelConfig, MoEConfig
from lumina_ds.models.transformer import Transformer


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--expert-ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--paths", default="grouped,loop", help="comma list of: grouped, loop (default: both)")
    return p.parse_args()


def build(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    experts = MoEConfig(num_experts=args.experts, top_k=2, expert_intermediate_size=args.expert_ffn)
    config = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=16,
                         num_kv_heads=4, max_seq_len=args.seq_len, tie_embeddings=False, moe=experts)  # fmt: skip
    return Transformer(config).to(device)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    device = ids.device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        out = model(ids, labels=ids, position_ids=torch.arange(ids.shape[1], device=ids.device).expand_as(ids))
    out["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def count_syncs(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> int | None:
    if ids.device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(model, optimizer, ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def time_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        if ids.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, optimizer, ids)
        if ids.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def run(path: str, args: argparse.Namespace, device: torch.device) -> str:
    moe.EXPERTS_PATH = path
    model = build(args, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), device=device)
    train_step(model, optimizer, ids)  # warm-up: kernels chosen, allocator warm
    syncs = count_syncs(model, optimizer, ids)
    times = time_steps(model, optimizer, ids, args.steps)
    tokens = args.batch_size * args.seq_len / statistics.median(times)
    with contextlib.suppress(Exception):
        del model, optimizer
    return (f"{path:<8} syncs/step {syncs if syncs is not None else 'n/a (CPU)':>10}  step ms median "
            f"{1000 * statistics.median(times):8.1f} [{1000 * min(times):.1f}-{1000 * max(times):.1f}]  "
            f"tokens/s {tokens:>10,.0f}")  # fmt: skip


def main() -> None:
    args = parse()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(f"device {name} | torch {torch.__version__} | {args.layers} MoE layers x {args.experts} experts | "
          f"batch {args.batch_size} x {args.seq_len} | {precision}")  # fmt: skip
    for path in args.paths.split(","):
        print(run(path, args, device), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
