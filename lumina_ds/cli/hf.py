"""`import-hf` and `export`: the Hugging Face boundary (lumina_ds/hf)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from lumina_ds.errors import CheckpointError

if TYPE_CHECKING:
    from lumina_ds.hf.export import ExportReport


def cmd_import_hf(args: argparse.Namespace) -> int:
    from lumina_ds.hf.importer import import_hf

    report = import_hf(args.model_dir, args.output, max_shard_mb=args.max_shard_mb)
    mb = report.bytes_written / 1e6
    print(
        f"imported {args.model_dir} ({report.arch}, {report.parameters:,} parameters) into {report.run_dir}: "
        f"{mb:,.1f} MB in {report.seconds:.1f} s ({mb / max(report.seconds, 1e-9):,.1f} MB/s)"
    )
    print(f"chat: lumina-ds chat --checkpoint {report.run_dir}")
    print(f"fine-tune: lumina-ds train --init-from {report.run_dir} --train-data CHATS ...")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lumina_ds.hf.export import export_run, parse_size
    from lumina_ds.hf.verify import TOLERANCE
    from lumina_ds.training.tag_weights import ensure_weights

    report = export_run(
        ensure_weights(args.checkpoint),
        args.output,
        arch=args.arch,
        dtype=args.dtype,
        max_shard_bytes=parse_size(args.max_shard_size),
        verify=not args.no_verify,
    )
    print(
        f"exported {report.arch} ({report.dtype}) to {report.out_dir}: {report.bytes_written / 1e6:,.1f} MB in "
        f"{report.seconds:.1f} s ({report.mb_per_s:,.1f} MB/s)"
    )
    check = report.verification
    if check is None:
        print(f"verification skipped: {report.skipped}")
        return 0
    figure = f"max |logit difference| {check.max_abs_diff:.2e} over {check.tokens} probe tokens (fp32)"
    if not check.passed:
        raise CheckpointError(
            "E306",
            f"export of {args.checkpoint} does not match: {figure}, above {TOLERANCE:g}",
            f"the export is left in {report.out_dir} for inspection; report it with config.yaml",
        )
    print(f"verified with transformers: {figure} <= {TOLERANCE:g}, against the same {report.dtype} weights")
    print(rounding_line(report))
    return 0


def rounding_line(report: ExportReport) -> str:
    """What the export's dtype cost, measured against the checkpoint as stored: a silent bf16 rounding of an fp32
    model is the loss a user would otherwise not see."""
    assert report.verification is not None
    loss, stored = report.verification.rounding_loss, report.stored_dtype
    if loss == 0.0:
        return f"{report.dtype} rounding changes logits by at most 0 (the checkpoint stores {stored}: nothing lost)"
    exact = " (--dtype fp32 keeps them exactly)" if report.dtype == "bf16" and stored != "fp64" else ""
    return f"{report.dtype} rounding changes logits by at most {loss:.2e} from the stored {stored} weights{exact}"


def register(sub: argparse._SubParsersAction) -> None:
    from lumina_ds.hf.architectures import SUPPORTED

    p = sub.add_parser("import-hf", help="turn a Hugging Face model directory into a lumina-ds run directory")
    p.add_argument("model_dir", help="config.json, safetensors (+ index) and tokenizer.json; nothing in it is run")
    p.add_argument("--output", required=True, help="the run directory to create (required; must not exist)")
    p.add_argument("--max-shard-mb", type=int, default=5120, help="largest weights shard written (default: 5120)")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face model directory, verified")
    p.add_argument("checkpoint", help="run dir, checkpoints dir or tag (its newest complete tag is exported)")
    p.add_argument("--output", required=True, help="the directory to create (required; must not exist)")
    p.add_argument(
        "--arch",
        default="auto",
        choices=["auto", *SUPPORTED],
        help="architecture to write (default: auto, the first that represents the model exactly)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["bf16", "fp32"],
        help="weights dtype (default: the checkpoint's stored dtype: bf16 for a bf16 run, fp32 for an fp32-trained or "
        "fp32-imported model, which bf16 would round)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip loading the export in transformers (default: verify when transformers is installed)",
    )
    p.set_defaults(func=cmd_export)
