"""`chat`: talk to a trained model."""

from __future__ import annotations

import argparse


def cmd_chat(args: argparse.Namespace) -> int:
    import torch

    from lumina_ds.generation import ChatSession, SamplingConfig, load_for_inference, one_shot, run_repl
    from lumina_ds.generation.chat import require_utf8

    # before the load, which takes minutes for a large checkpoint; ChatSession checks again on every turn
    if args.prompt is not None:
        require_utf8(args.prompt, "--prompt")
    if args.system_prompt:
        require_utf8(args.system_prompt, "--system-prompt")
    sampling = SamplingConfig(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_tokens,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    from lumina_ds.training.tag_weights import ensure_weights

    bundle = load_for_inference(ensure_weights(args.checkpoint), device=device, dtype=dtype)
    session = ChatSession(bundle, sampling, system_prompt=args.system_prompt)
    if args.prompt is not None:
        one_shot(session, args.prompt, stream=lambda text: print(text, end="", flush=True))
        print()
        return 0
    run_repl(session)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="talk to a trained model (REPL, or one answer with --prompt)")
    p.add_argument("--checkpoint", "--resume", dest="checkpoint", required=True,
                   help="run dir, checkpoints dir or tag (required)")  # fmt: skip
    p.add_argument("--prompt", help="answer this one message and exit (default: an interactive REPL)")
    p.add_argument("--system-prompt", default=None, help="system message for the conversation (default: none)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass, 1 = off (default: 0.9)")
    p.add_argument("--top-k", type=int, default=50, help="keep the k most likely tokens, 0 = off (default: 50)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=256,
        help="longest reply in tokens, at most what the prompt leaves of the context (default: 256)",
    )
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off (default: 1.0)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible (default: random)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=cmd_chat)
