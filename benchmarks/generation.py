"""Generation speed: lumina-ds's KV-cache decoding against transformers' `generate` on the same weights, in one run.

One model is built with random weights (seeded) and mapped into transformers with lumina_ds.hf (the mapping and
config.json `lumina-ds export` writes, loaded from a temporary directory so that transformers converts the per-expert
tensors itself). For each batch size and prompt length: prefill tokens/s (one forward over the prompts, cache
filled), and decode tokens/s (greedy, exactly --new-tokens per row, no stop token) over the time after the prefill.
Both run greedy, so their tokens must agree: the check is printed.

At batch 1 lumina runs lumina_ds.generation.generate (the chat REPL's path); at batch > 1,
lumina_ds.generation.batched.generate_batch, which decodes the B rows together in one forward per step, as
transformers does.

    python benchmarks/generation.py                          # reference MoE h256 L4 E8 top-2 vocab 8192
    python benchmarks/generation.py --batch-sizes 1 8 --sequence-lengths 64 256 --new-tokens 64
    python benchmarks/generation.py --dry-run                # tiny sizes: the smoke test's run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lumina_ds.generation.batched import generate_batch
from lumina_ds.generation.sampling import SamplingConfig, generate
from lumina_ds.hf.architectures import export_architecture, hf_config_from_model
from lumina_ds.hf.weights import ours_to_hf
from lumina_ds.models.config import ModelConfig, MoEConfig
from lumina_ds.models.transformer import Transformer

RATIO_LINE = "ratio lumina / transformers tokens/s: {:.2f}x"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-ffn", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--sequence-lengths", type=int, nargs="+", default=[128], help="prompt lengths in tokens")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per row")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per setting (the median is kept)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's; 1 with --dry-run). On a CPU other jobs share, use 1: "
                   "OpenMP threads that wait on busy cores made 2 threads 1000x slower here")  # fmt: skip
    p.add_argument("--peer-experts-impl", default=None, help="transformers experts_implementation (default: its own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="append one JSON object per setting (JSON lines)")
    p.add_argument("--dry-run", action="store_true", help="tiny model and sizes, one repeat (the smoke test)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.hidden, args.layers, args.heads, args.kv_heads, args.experts = 32, 2, 4, 2, 4
        args.expert_ffn, args.vocab, args.batch_sizes, args.sequence_lengths = 32, 128, [1, 2], [8]
        args.new_tokens, args.repeats, args.threads = 4, 1, args.threads or 1
    return args


def model_config(args: argparse.Namespace) -> ModelConfig:
    moe = MoEConfig(num_experts=args.experts, top_k=args.top_k, expert_intermediate_size=args.expert_ffn)
    return ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                       num_kv_heads=args.kv_heads, intermediate_size=4 * args.hidden, tie_embeddings=False,
                       max_seq_len=max(args.sequence_lengths) + args.new_tokens, attention_backend="sdpa",
                       moe=moe)  # fmt: skip


def transformers_twin(config: ModelConfig, model: Transformer, experts_impl: str | None) -> tuple[nn.Module, str]:
    """The same weights in transformers' model of the architecture lumina-ds exports to; -> (model, architecture)."""
    from transformers import AutoModelForCausalLM

    arch = export_architecture(config)
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    tensors = {name: t.contiguous() for name, t in ours_to_hf(config, arch, list(state), state.__getitem__)}
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, str(Path(tmp) / "model.safetensors"))
        (Path(tmp) / "config.json").write_text(json.dumps(hf_config_from_model(config, arch=arch)))
        extra = {"experts_implementation": experts_impl} if experts_impl else {}
        twin = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, **extra)
    return twin.eval(), arch


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


@torch.no_grad()
def lumina_run(model: Transformer, prompts: torch.Tensor, new_tokens: int) -> tuple[float, float, list[list[int]]]:
    """(prefill seconds, generate seconds, tokens per row): generate() at batch 1, generate_batch() above."""
    prefill, _ = _timed(lambda: model(prompts, kv_cache=model.new_kv_cache()))
    greedy = SamplingConfig(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=new_tokens)
    if len(prompts) == 1:
        total, rows = _timed(lambda: [generate(model, prompts[0].tolist(), greedy, stop_ids=())])
    else:
        total, rows = _timed(lambda: generate_batch(model, prompts.tolist(), greedy, stop_ids=()))
    return prefill, total, rows


@torch.no_grad()
def transformers_run(model: Any, prompts: torch.Tensor, new_tokens: int) -> tuple[float, float, list[list[int]]]:
    """(prefill seconds, generate seconds, tokens per row): one batched generate(), exactly new_tokens per row."""
    prefill, _ = _timed(lambda: model(input_ids=prompts, use_cache=True))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                  pad_token_id=0, attention_mask=torch.ones_like(prompts))  # fmt: skip
    total, out = _timed(lambda: model.generate(prompts, **kwargs))
    return prefill, total, out[:, prompts.shape[1] :].tolist()


@dataclasses.dataclass
class Result:
    impl: str
    batch: int
    prompt_len: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    generate_tokens_per_s: float  # new tokens over the whole generate call (prefill included)
    tokens: list[list[int]] = dataclasses.field(repr=False)


def measure(impl: str, run: Callable[..., tuple[float, float, list[list[int]]]], model: nn.Module,
            prompts: torch.Tensor, args: argparse.Namespace) -> Result:  # fmt: skip
    """The median over --repeats of each time, after one untimed warm-up run."""
    run(model, prompts, args.new_tokens)
    runs = [run(model, prompts, args.new_tokens) for _ in range(args.repeats)]
    prefill = statistics.median(r[0] for r in runs)
    total = statistics.median(r[1] for r in runs)
    batch, prompt_len = prompts.shape
    new = batch * args.new_tokens
    return Result(impl, batch, prompt_len, args.new_tokens, batch * prompt_len / prefill,
                  new / max(total - prefill, 1e-9), new / total, runs[-1][2])  # fmt: skip


def settings(args: argparse.Namespace) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(args.seed)
    for batch in args.batch_sizes:
        for length in args.sequence_lengths:
            yield torch.randint(1, args.vocab, (batch, length), generator=generator)


def report(ours: Result, theirs: Result) -> list[str]:
    same = sum(a == b for a, b in zip(ours.tokens, theirs.tokens, strict=True))
    head = f"batch {ours.batch}, prompt {ours.prompt_len}, {ours.new_tokens} new tokens"
    lines = [f"{head}: greedy tokens equal in {same}/{ours.batch} rows"]
    for r in (ours, theirs):
        lines.append(f"  {r.impl:<13} tok/s: prefill {r.prefill_tokens_per_s:>10,.0f} | decode "
                     f"{r.decode_tokens_per_s:>8,.1f} | generate {r.generate_tokens_per_s:>8,.1f}")  # fmt: skip
    lines.append(f"  ratio prefill {ours.prefill_tokens_per_s / theirs.prefill_tokens_per_s:.2f}x, decode "
                 f"{ours.decode_tokens_per_s / theirs.decode_tokens_per_s:.2f}x")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        return run_all(args)
    finally:
        torch.set_num_threads(threads)  # a caller (the smoke test) keeps its own setting


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.manual_seed(args.seed)
    config = model_config(args)
    ours = Transformer(config).eval()
    theirs, arch = transformers_twin(config, ours, args.peer_experts_impl)
    print(f"model: h{args.hidden} L{args.layers} E{args.experts} top-{args.top_k} vocab {args.vocab} ({arch} in "
          f"transformers), fp32, {torch.get_num_threads()} threads; batches > 1 decode together")  # fmt: skip
    records, ratios = [], []
    for prompts in settings(args):
        mine = measure("lumina", lumina_run, ours, prompts, args)
        peer = measure("transformers", transformers_run, theirs, prompts, args)
        print("\n".join(report(mine, peer)), flush=True)
        ratios.append(mine.generate_tokens_per_s / peer.generate_tokens_per_s)
        for r in (mine, peer):
            records.append({k: v for k, v in dataclasses.asdict(r).items() if k != "tokens"})
    if args.output:
        with open(args.output, "a", encoding="utf-8") as file:
            file.writelines(json.dumps(r) + "\n" for r in records)
    geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print("(generate tokens/s, geometric mean over the settings)")
    print(RATIO_LINE.format(geomean))
    return records


if __name__ == "__main__":
    main()
