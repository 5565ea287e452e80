"""`lumina-ds` command line: thin parsers that build a config and call one function each."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lumina_ds import __version__, cli_data, cli_env, cli_scale, cli_validate
from lumina_ds.cli_train import add_train_arguments, run_config_from_args
from lumina_ds.config.presets import PRESETS, get_preset
from lumina_ds.errors import LuminaError


def cmd_train(args: argparse.Namespace) -> int:
    from lumina_ds.training.session import profile_data_loading, train

    if args.profile_data_loading:
        profile_data_loading(run_config_from_args(args), batches=args.profile_data_loading)
        return 0
    train(run_config_from_args(args))
    return 0


def cmd_estimate_parameters(args: argparse.Namespace) -> int:
    from lumina_ds.models.counting import count_parameters

    run = get_preset(args.preset)
    seq_len = args.seq_len or run.seq_len
    count = count_parameters(run.model, seq_len=seq_len)
    if args.json:
        print(json.dumps({"preset": args.preset, **count.as_dict()}))
        return 0
    print(f"preset {args.preset}: {count.total:,} parameters, {count.active:,} active per token")
    for name, n in count.by_component.items():
        if n:
            print(f"  {name:<15} {n:>18,}  {100 * n / count.total:5.1f}%")
    print(f"  training FLOPs/token {count.flops_per_token:.3e} (6*N_active + attention at seq {seq_len})")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    import torch

    from lumina_ds.generation import ChatSession, SamplingConfig, load_for_inference, one_shot, run_repl

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
    bundle = load_for_inference(args.checkpoint, device=device, dtype=dtype)
    session = ChatSession(bundle, sampling, system_prompt=args.system_prompt)
    if args.prompt is not None:
        one_shot(session, args.prompt, stream=lambda text: print(text, end="", flush=True))
        print()
        return 0
    run_repl(session)
    return 0


def _chat_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="talk to a trained model (REPL, or one answer with --prompt)")
    p.add_argument("--checkpoint", "--resume", dest="checkpoint", required=True, help="run dir, checkpoints dir or tag")
    p.add_argument("--prompt", help="answer this one message and exit")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=cmd_chat)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lumina-ds", description="Train Mixture-of-Experts chat models with DeepSpeed."
    )
    parser.add_argument("--version", action="version", version=f"lumina-ds {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model (single process; use launch/train.py under deepspeed for more)")
    add_train_arguments(p)
    p.add_argument(
        "--profile-data-loading",
        type=int,
        nargs="?",
        const=200,
        default=0,
        metavar="BATCHES",
        help="time the data pipeline for BATCHES micro-batches (default 200) without a model, then exit",
    )
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("estimate-parameters", help="total and active parameters of a preset, by component")
    p.add_argument("--preset", "--config", dest="preset", choices=list(PRESETS), default="debug")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for the FLOPs estimate")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_estimate_parameters)
    _chat_parser(sub)
    for module in (cli_validate, cli_data, cli_scale, cli_env):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LuminaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def entry() -> None:
    """Console-script entry: like main(), but leaves through os._exit after a distributed run.

    torch's gloo teardown can abort after a clean finish (see DEEPSPEED_FACTS.md), turning success into SIGABRT.
    """
    code = main()
    if "torch" not in sys.modules:  # a light command (validate-data, plan, ...): nothing distributed ran
        sys.exit(code)
    from lumina_ds.distributed.env import exit_process

    exit_process(code)


if __name__ == "__main__":
    entry()
