"""Training throughput of lumina-ds's model side by side with a peer implementation of the same architecture.

For each implementation, at the identical configuration, in this one process: full training steps (forward, backward,
AdamW step, zero_grad) on the same seeded random token batches; warm-up steps excluded; median/min/max step time,
tokens/s, achieved TFLOP/s, MFU (GPU only), peak memory, parameter counts. A table goes to stdout, one JSON object per
implementation is appended to --output (JSON lines). See benchmarks/NOTES.md for results and method.

    python benchmarks/throughput.py --preset debug
    python benchmarks/throughput.py --hidden 256 --layers 4 --heads 8 --kv-heads 8 --experts 8 --top-k 2 \
        --expert-ffn 512 --vocab 8192 --no-tie --batch-size 8 --seq-len 256 --precision bf16
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import torch
from torch import nn

from lumina_ds.config.presets import get_preset
from lumina_ds.models.config import ModelConfig
from lumina_ds.models.counting import count_parameters
from lumina_ds.models.transformer import Transformer
from lumina_ds.planning.hardware import gpu_spec_of_device

FLOPS_NOTE = "flops_per_token from lumina_ds count_parameters (6*N_active_compute + 12*L*d*s), same for every impl"
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids [B, S], shifted labels [B, S], unshifted [B, S]
StepFn = Callable[[Batch], torch.Tensor]


EAGER_IMPLS = ("lumina", "lumina+compile", "mixtral")  # lumina+compile: our model with --compile's regions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="debug", help="base architecture; the flags below override its fields")
    for flag in ("hidden", "layers", "heads", "kv-heads", "experts", "top-k", "expert-ffn", "vocab"):
        p.add_argument(f"--{flag}", type=int, default=None)
    p.add_argument("--tie", dest="tie", action="store_true", default=None, help="tie embeddings (default: preset)")
    p.add_argument("--no-tie", dest="tie", action="store_false", help="untie embedding and LM head")
    p.add_argument("--shared", dest="no_shared", action="store_false", help="keep the preset's shared experts")
    p.add_argument("--no-shared", dest="no_shared", action="store_true", default=True,
                   help="drop shared experts (default: Mixtral has none, so both models stay identical)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--peers", default="lumina,mixtral", help="comma list of: lumina, lumina+compile, mixtral")
    p.add_argument("--peer-experts-impl", default=None, help="Mixtral experts_implementation (default: HF's)")
    p.add_argument("--deepspeed", action="store_true", help="also run our model through deepspeed.initialize")
    p.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3))
    p.add_argument("--output", default=None, help="append one JSON line per result to this file")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: os.cpu_count())")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N ops of one profiled step")
    p.add_argument("--ceiling", action="store_true",
                   help="also time a square matmul in the run's precision (best of 5): the ceiling")  # fmt: skip
    p.add_argument("--interleave", action="store_true",
                   help="after the runs, time ours and the peer again step by step in turn (a shared, noisy CPU "
                        "slows both alike); the ratio line then uses these times")  # fmt: skip
    return p.parse_args(argv)


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    """The preset's ModelConfig with the command-line overrides applied (and shared experts dropped by default)."""
    mc = get_preset(args.preset).model
    overrides = {
        "hidden_size": args.hidden,
        "num_layers": args.layers,
        "num_heads": args.heads,
        "num_kv_heads": args.kv_heads,
        "vocab_size": args.vocab,
        "tie_embeddings": args.tie,
    }
    mc = dataclasses.replace(mc, **{k: v for k, v in overrides.items() if v is not None})
    moe_overrides = {"num_experts": args.experts, "top_k": args.top_k, "expert_intermediate_size": args.expert_ffn}
    moe = dataclasses.replace(mc.moe, **{k: v for k, v in moe_overrides.items() if v is not None})
    if args.no_shared:
        moe = dataclasses.replace(moe, num_shared_experts=0, shared_intermediate_size=0)
    mc = dataclasses.replace(mc, moe=moe, max_seq_len=max(mc.max_seq_len, args.seq_len))
    mc.validate()
    return mc


def mixtral_config(mc: ModelConfig, experts_impl: str | None = None) -> Any:
    """transformers.MixtralConfig with the same architecture as our ModelConfig (Mixtral has no shared experts)."""
    from transformers import MixtralConfig

    cfg = MixtralConfig(
        vocab_size=mc.vocab_size,
        hidden_size=mc.hidden_size,
        intermediate_size=mc.moe.expert_intermediate_size,
        num_hidden_layers=mc.num_layers,
        num_attention_heads=mc.num_heads,
        num_key_value_heads=mc.num_kv_heads,
        head_dim=mc.head_dim,
        num_local_experts=mc.moe.num_experts,
        num_experts_per_tok=mc.moe.top_k,
        max_position_embeddings=mc.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": mc.rope_theta},
        rms_norm_eps=mc.rms_norm_eps,
        tie_word_embeddings=mc.tie_embeddings,
        output_router_logits=True,
        router_aux_loss_coef=mc.moe.load_balancing_weight,
        initializer_range=mc.init_std,
        use_cache=False,
    )
    cfg._attn_implementation = "sdpa"
    if experts_impl:
        cfg._experts_implementation = experts_impl
    return cfg


def make_batches(vocab: int, batch: int, seq: int, count: int, seed: int, device: torch.device) -> list[Batch]:
    """Seeded random tokens [B, S+1]: ours gets (tokens[:, :S], tokens[:, 1:]); HF gets tokens[:, :S] as labels."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(device)
        out.append((tokens[:, :-1], tokens[:, 1:], tokens[:, :-1]))
    return out


def autocast_ctx(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def eager_step_fn(impl: str, model: nn.Module, precision: str, device: torch.device, lr: float) -> StepFn:
    """forward (under autocast for bf16) -> backward -> AdamW step -> zero_grad; returns the detached loss.

    Both take torch's fused AdamW, each toolkit's default: lumina-ds trains with it, and so does the Hugging Face
    Trainer (`adamw_torch_fused` from torch 2.8)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)

    def step(batch: Batch) -> torch.Tensor:
        input_ids, shifted, unshifted = batch
        with autocast_ctx(precision, device):
            if impl == "mixtral":  # HF shifts labels internally
                loss = model(input_ids=input_ids, labels=unshifted).loss
            else:
                loss = model(input_ids, labels=shifted)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def deepspeed_step_fn(model: nn.Module, args: argparse.Namespace) -> tuple[StepFn, nn.Module]:
    """Our model inside a single-process DeepSpeed engine (ZeRO --zero-stage, client torch AdamW)."""
    from lumina_ds.distributed.env import init_distributed

    init_distributed()  # sets RANK/WORLD_SIZE/MASTER_* and DS_ACCELERATOR=cpu without CUDA, starts the group
    import deepspeed

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": args.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if args.precision == "bf16":
        config["bf16"] = {"enabled": True}  # DeepSpeed's mixed bf16: bf16 weights, fp32 master copy
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)  # as lumina-ds trains
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)

    def step(batch: Batch) -> torch.Tensor:
        input_ids, shifted, _ = batch
        loss = engine(input_ids, labels=shifted)["loss"]
        engine.backward(loss)
        engine.step()  # optimizer step + zero_grad
        return loss.detach()

    return step, engine.module


def build_model(impl: str, mc: ModelConfig, args: argparse.Namespace, device: torch.device) -> nn.Module:
    torch.manual_seed(args.seed)
    if impl == "mixtral":
        from transformers import MixtralForCausalLM

        model = MixtralForCausalLM(mixtral_config(mc, args.peer_experts_impl))
    else:
        model = Transformer(mc)
        if impl == "lumina+compile":
            model.compile_blocks()  # as --compile: regional, compiled on the first (warm-up) step
    return model.to(device).train()


def param_counts(model: nn.Module, top_k: int, num_experts: int) -> tuple[int, int]:
    """(total, active) of a built model: routed-expert tensors (names containing 'experts') count top_k/E."""
    total = expert = 0
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if ".experts." in name:
            expert += p.numel()
    return total, total - expert + expert * top_k // max(num_experts, 1)


class MemoryMeter:
    """Peak memory of a run: CUDA max_memory_allocated, or on CPU the peak RSS increase over a baseline.

    On CPU the kernel's RSS high-water mark is reset (`echo 5 > /proc/self/clear_refs`) after gc + malloc_trim, before
    the model is built; the peak is VmHWM afterwards minus the RSS then. It covers weights, grads, optimizer state,
    activations and the allocator's cache. Without /proc (not Linux) it falls back to getrusage's ru_maxrss, which is
    the whole process's lifetime peak and so over-counts for every implementation after the first.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self.kind = "cuda max_memory_allocated"
        if device.type != "cuda":
            self.kind = "cpu peak RSS increase over pre-build RSS (VmHWM after clear_refs)"

    def __enter__(self) -> MemoryMeter:
        release_memory()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return self
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
        except OSError:
            self.kind = "cpu process lifetime peak RSS (ru_maxrss) minus pre-build RSS"
        self.baseline = psutil.Process().memory_info().rss
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self.peak_bytes = max(0, peak_rss_bytes() - self.baseline)


def peak_rss_bytes() -> int:
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back so the next baseline is honest


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step: StepFn, batches: list[Batch], warmup: int, device: torch.device) -> tuple[list[float], float]:
    """Run every batch; return (seconds of each post-warm-up step, last loss)."""
    times: list[float] = []
    loss = torch.zeros(())
    for i, batch in enumerate(batches):
        sync(device)
        start = time.perf_counter()
        loss = step(batch)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times, float(loss)


def interleaved_times(
    steps: dict[str, StepFn], batches: list[Batch], warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per post-warm-up step of each implementation, run in turn on each batch (order alternating)."""
    times: dict[str, list[float]] = {impl: [] for impl in steps}
    order = list(steps)
    for i, batch in enumerate(batches):
        for impl in order if i % 2 == 0 else order[::-1]:
            sync(device)
            start = time.perf_counter()
            steps[impl](batch)
            sync(device)
            if i >= warmup:
                times[impl].append(time.perf_counter() - start)
    return times


def add_interleaved(
    results: list[dict[str, Any]], mc: ModelConfig, args: argparse.Namespace, batches: list[Batch]
) -> None:
    """Rebuild the eager implementations and record their interleaved median step time (`interleaved_ms_median`)."""
    device = batches[0][0].device
    steps = {}
    for r in results:
        if r["impl"] in EAGER_IMPLS:
            model = build_model(r["impl"], mc, args, device)
            steps[r["impl"]] = eager_step_fn(r["impl"], model, args.precision, device, args.lr)
    times = interleaved_times(steps, batches, args.warmup, device)
    for r in results:
        if r["impl"] in times:
            r["interleaved_ms_median"] = 1e3 * statistics.median(times[r["impl"]])


def matmul_ceiling_tflops(precision: str, device: torch.device, *, size: int = 2048, reps: int = 5) -> float:
    """TFLOP/s of the fastest of `reps` square [size, size] matmuls in the run's dtype: the ceiling of this machine."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection, oneDNN primitive creation
    best = float("inf")
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def cpu_model_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> tuple[str, float | None]:
    """(device name, bf16 dense peak TFLOP/s or None when unknown / CPU)."""
    if device.type != "cuda":
        return f"cpu: {cpu_model_name()} ({os.cpu_count()} cores)", None
    name = torch.cuda.get_device_name(device)
    spec = gpu_spec_of_device(name)  # the planner's table: one set of peaks for plans, MFU and the README
    peak = spec.bf16 if spec is not None and spec.bf16 is not None else spec.fp16 if spec is not None else None
    return name, peak / 1e12 if peak is not None else None


def profile_step(step: StepFn, batch: Batch, top: int, impl: str) -> None:
    """Print the top ops (self time) of one training step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step(batch)
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(f"\n--- profile: {impl} (one step, top {top} by self time) ---")
    print(prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=48))


def run_impl(impl: str, mc: ModelConfig, args: argparse.Namespace, batches: list[Batch]) -> dict[str, Any]:
    """Build one implementation, train it over the batches, and return its measurements."""
    device = batches[0][0].device
    with MemoryMeter(device) as meter:
        model = build_model("mixtral" if impl == "mixtral" else "lumina", mc, args, device)
        total, active = param_counts(model, mc.moe.top_k, mc.moe.num_experts)
        if impl == "lumina+deepspeed":
            step, _ = deepspeed_step_fn(model, args)
        else:
            step = eager_step_fn(impl, model, args.precision, device, args.lr)
        times, loss = time_steps(step, batches, args.warmup, device)
        if args.profile:
            profile_step(step, batches[-1], args.profile, impl)
    extra = {"experts_impl": getattr(model.config, "_experts_implementation", None)} if impl == "mixtral" else {}
    del model, step
    release_memory()
    return {
        "impl": impl,
        "params_total": total,
        "params_active": active,
        "step_ms_median": 1e3 * statistics.median(times),
        "step_ms_min": 1e3 * min(times),
        "step_ms_max": 1e3 * max(times),
        "final_loss": loss,
        "peak_mem_bytes": meter.peak_bytes,
        "peak_mem_kind": meter.kind,
        **extra,
    }


def add_rates(result: dict[str, Any], tokens_per_step: int, flops_per_token: float, peak: float | None) -> None:
    """tokens/s from the median step; TFLOP/s = flops_per_token * tokens/s; MFU where the peak is known."""
    tokens_per_s = tokens_per_step / (result["step_ms_median"] / 1e3)
    tflops = flops_per_token * tokens_per_s / 1e12
    result.update(
        tokens_per_s=tokens_per_s,
        flops_per_token=flops_per_token,
        tflops=tflops,
        mfu=tflops / peak if peak else None,
    )


def environment(args: argparse.Namespace, mc: ModelConfig, device: torch.device) -> dict[str, Any]:
    import transformers

    name, peak = device_info(device)
    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": name,
        "peak_tflops": peak,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "precision": args.precision,
        "flops_note": FLOPS_NOTE,
        "config": {
            "preset": args.preset,
            "model": dataclasses.asdict(mc),
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "warmup": args.warmup,
            "seed": args.seed,
            "zero_stage": args.zero_stage if args.deepspeed else None,
        },
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_table(results: list[dict[str, Any]]) -> str:
    head = ("impl", "params tot/act", "tokens/s", "step ms med [min-max]", "TFLOP/s", "MFU", "peak mem")
    rows = [head]
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        rows.append((
            r["impl"],
            f"{r['params_total'] / 1e6:.2f}M/{r['params_active'] / 1e6:.2f}M",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['step_ms_median']:.1f} [{r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}]",
            f"{r['tflops']:.4f}",
            mfu,
            human_bytes(r["peak_mem_bytes"]),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def ratio_lines(results: list[dict[str, Any]]) -> Iterator[str]:
    by_impl = {r["impl"]: r for r in results}
    if "mixtral" not in by_impl:
        return
    for impl in ("lumina", "lumina+compile", "lumina+deepspeed"):
        if impl in by_impl:
            ratio = by_impl[impl]["tokens_per_s"] / by_impl["mixtral"]["tokens_per_s"]
            yield f"ratio {impl} / mixtral tokens/s: {ratio:.2f}x"
    mem = (
        by_impl["lumina"]["peak_mem_bytes"] / max(by_impl["mixtral"]["peak_mem_bytes"], 1) if "lumina" in by_impl else 0
    )
    if mem:
        yield f"ratio lumina / mixtral peak memory: {mem:.2f}x"
    for impl, r in by_impl.items():
        if r.get("ceiling_tflops"):
            share = 100 * r["tflops"] / r["ceiling_tflops"]
            yield (
                f"{impl}: {r['tflops'] * 1e3:.0f} GFLOP/s = {share:.0f}% of the matmul ceiling measured in this run "
                f"({r['ceiling_tflops'] * 1e3:.0f} GFLOP/s)"
            )
    yield from interleaved_lines(by_impl)


def interleaved_lines(by_impl: dict[str, dict[str, Any]]) -> Iterator[str]:
    """Each implementation against the peer (and compiled against eager) from the interleaved medians."""
    ms = {impl: r["interleaved_ms_median"] for impl, r in by_impl.items() if "interleaved_ms_median" in r}
    pairs = [(impl, "mixtral") for impl in ("lumina", "lumina+compile")] + [("lumina+compile", "lumina")]
    for ours, base in pairs:
        if ours in ms and base in ms:
            yield (f"interleaved: {ours} {ms[ours]:.1f} ms, {base} {ms[base]:.1f} ms per step -> ratio {ours} / {base} "
                   f"tokens/s: {ms[base] / ms[ours]:.2f}x")  # fmt: skip


def report(results: list[dict[str, Any]], env: dict[str, Any], output: str | None) -> None:
    cfg = env["config"]
    print(f"device: {env['device']} | torch {env['torch']} | transformers {env['transformers']} | "
          f"threads {env['threads']} | precision {env['precision']} | batch {cfg['batch_size']}x{cfg['seq_len']} | "
          f"{cfg['steps']} steps after {cfg['warmup']} warm-up")  # fmt: skip
    print(format_table(results))
    for line in ratio_lines(results):
        print(line)
    print(f"note: {FLOPS_NOTE}; peak mem = {results[0]['peak_mem_kind']}")
    if output:
        with open(output, "a", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps({**env, **r}) + "\n")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mc = model_config_from_args(args)
    impls = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(impls) - set(EAGER_IMPLS)
    if unknown:
        raise SystemExit(f"unknown peers {sorted(unknown)}: choose from {', '.join(EAGER_IMPLS)}")
    if args.deepspeed:
        impls.append("lumina+deepspeed")
    batches = make_batches(mc.vocab_size, args.batch_size, args.seq_len, args.warmup + args.steps, args.seed, device)
    flops_per_token = count_parameters(mc, seq_len=args.seq_len).flops_per_token
    env = environment(args, mc, device)
    results = []
    for impl in impls:
        result = run_impl(impl, mc, args, batches)
        add_rates(result, args.batch_size * args.seq_len, flops_per_token, env["peak_tflops"])
        results.append(result)
    if args.interleave:
        add_interleaved(results, mc, args, batches)
    if args.ceiling:
        ceiling = matmul_ceiling_tflops(args.precision, device)
        for r in results:
            r["ceiling_tflops"] = ceiling
    env["ru_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report(results, env, args.output)
    return [{**env, **r} for r in results]


if __name__ == "__main__":
    main(sys.argv[1:])
