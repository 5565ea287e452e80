"""`generate-check`: answer a fixed (or your) set of prompts greedily from a checkpoint, in one or every precision."""

from __future__ import annotations

import argparse

DEFAULT_MAX_TOKENS = 64


def generation_check(checkpoint: str, *, prompts_file: str | None = None, compare_precisions: bool = False,
                     max_tokens: int = DEFAULT_MAX_TOKENS, device: str | None = None) -> None:  # fmt: skip
    """Run the check and print its report (also what `train --test-generation` calls after training, on rank 0)."""
    import torch

    from lumina_ds.generation.check import DEFAULT_PROMPTS, format_report, read_prompts, run_check
    from lumina_ds.training.tag_weights import ensure_weights

    prompts = read_prompts(prompts_file) if prompts_file else list(DEFAULT_PROMPTS)
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ensure_weights(checkpoint)
    generations, path = run_check(checkpoint, prompts=prompts, max_new_tokens=max_tokens,
                                  compare_precisions=compare_precisions, device=where)  # fmt: skip
    print(format_report(generations, path), flush=True)


def cmd_generate_check(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        from lumina_ds.errors import ConfigError

        raise ConfigError("E002", f"--max-tokens {args.max_tokens} must be >= 1")
    generation_check(args.checkpoint, prompts_file=args.prompts, compare_precisions=args.compare_precisions,
                     max_tokens=args.max_tokens, device=args.device)  # fmt: skip
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate-check",
        help="answer a set of prompts greedily from a checkpoint into <run dir>/generations.jsonl",
        description="Answer prompts greedily (temperature 0) from the newest checkpoint; with --compare-precisions, "
        "again in each lower precision the device supports, with their token agreement against fp32.",
    )
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir or tag (required)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="one prompt per line, or JSONL {\"prompt\": ...} (default: 5 built-in prompts)")  # fmt: skip
    p.add_argument("--compare-precisions", action="store_true",
                   help="also bf16 (and fp16 on a GPU), with token agreement against fp32 (default: off)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"longest reply in tokens (default: {DEFAULT_MAX_TOKENS})")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=cmd_generate_check)
