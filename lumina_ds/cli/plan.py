"""Sizing verbs: `estimate-parameters`, `plan`, `analyze-memory`, `dry-run`, `estimate-time`, `ds-config`; each for a
preset (`--preset`) or a model given by path (`--model`: lumina_ds/hf/model_path.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lumina_ds.config.presets import DEFAULT_PRESET, PRESETS, get_preset
from lumina_ds.config.run import ACTIVATION_CHECKPOINTING, PRECISIONS, RunConfig
from lumina_ds.errors import ConfigError
from lumina_ds.planning.hardware import GPU_KEYS

if TYPE_CHECKING:
    from lumina_ds.planning.planner import Cluster, Plan


def _gpu_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gpu",
        "--hardware-profile",
        dest="gpu",
        default="h100",
        help=f"GPU model for the step-time model and its memory: {', '.join(GPU_KEYS)} (LuminaAI's a100-80gb "
        "works) (default: h100, the SXM part)",
    )


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object on stdout (default: off)")


def _preset_arg(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    default = "this or --model is required" if required else f"default: {DEFAULT_PRESET}"
    p.add_argument("--preset", "--config", dest="preset", metavar="PRESET", default=None,
                   help=f"one of {', '.join(PRESETS)} ({default})")  # fmt: skip
    p.add_argument("--model", metavar="PATH", default=None,
                   help="in place of --preset, a model by path: a Hugging Face model directory or its config.json, a "
                   "lumina-ds run directory or checkpoint tag, or a YAML run config; only config files are read, the "
                   "model is built on the meta device, and it is planned as `train --init-from PATH` fine-tunes it "
                   "(a YAML config: with its own settings) (default: none)")  # fmt: skip
    p.set_defaults(preset_required=required)


def run_of(args: argparse.Namespace, *, seq_len: int | None = None) -> RunConfig:
    """The run a command plans: --preset's (E001 when unknown), or --model's (E004/E005), whose --seq-len is checked
    against the model's context (E002)."""
    if args.preset is not None and args.model is not None:
        raise ConfigError("E002", "--preset and --model both given",
                          "give one: --preset NAME plans a preset, --model PATH a model by its path")  # fmt: skip
    if args.model is None:
        if args.preset is None and args.preset_required:
            raise ConfigError("E002", "no model to plan", f"give --preset ({', '.join(PRESETS)}) or --model PATH")
        if args.preset is not None and args.preset not in PRESETS and Path(args.preset).expanduser().exists():
            raise ConfigError("E001", f"unknown preset {args.preset!r}",
                              f"{args.preset} is a path: --model {args.preset} plans the model there")  # fmt: skip
        return get_preset(args.preset or DEFAULT_PRESET)
    from lumina_ds.hf.model_path import run_for_model

    run = run_for_model(args.model)
    if seq_len is not None:
        run.data.seq_len = seq_len
        run.validate()  # E002 past the model's context, as `train` refuses it
    return run


def subject(args: argparse.Namespace) -> dict[str, Any]:
    """What a command's JSON names as planned: {"preset": NAME} or {"model": PATH}."""
    return {"model": args.model} if args.model is not None else {"preset": args.preset or DEFAULT_PRESET}


def named(document: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """A plan's JSON with its "preset" key replaced by `subject` (a model's path is no preset)."""
    return {**subject(args), **{k: v for k, v in document.items() if k != "preset"}}


def _cluster_args(p: argparse.ArgumentParser, *, nodes_required: bool = True) -> None:
    _preset_arg(p)
    nodes_help = "required" if nodes_required else "default: the preset's reference cluster (ds_configs/README.md)"
    p.add_argument("--nodes", type=int, required=nodes_required, help=f"nodes in the cluster ({nodes_help})")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default: 8)")
    p.add_argument("--gpu-mem-gb", type=float, default=None,
                   help="memory per GPU in GiB as torch reports it, which is below the datasheet's GB (an 80 GB H100 "
                   "reports 79.1; check-environment shows yours) (default: the --gpu's)")  # fmt: skip
    p.add_argument("--cpu-mem-gb", type=float, default=1024.0, help="host memory per node (default: 1024)")
    p.add_argument("--nvme-gb", type=float, default=0.0,
                   help="NVMe space per node for ZeRO-Infinity's swap files; > 0 lets the plan offload optimizer "
                   "states (and parameters) there at ZeRO-3 (default: 0, no NVMe)")  # fmt: skip
    p.add_argument("--nvme-gbps", type=float, default=25.0,
                   help="NVMe reads + writes per node in GB/s, for the step time (default: 25)")  # fmt: skip
    p.add_argument("--fs-write-gbps", type=float, default=2.0,
                   help="GB/s one node writes to the shared filesystem, for the save time (default: 2)")  # fmt: skip
    p.add_argument(
        "--nvme-path",
        default="/local_nvme",
        help="the NVMe mount a planned layout swaps to (train's --nvme-path) (default: /local_nvme)",
    )
    add_headroom_arg(p)
    _gpu_arg(p)
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: the preset's, max 4096)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto plans mixed bf16 (default: auto)")
    p.add_argument("--mfu", type=float, default=0.4,
                   help="assumed model FLOPs utilisation for the step time (default: 0.4)")  # fmt: skip


def add_headroom_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-headroom", type=float, default=0.10, metavar="FRACTION",
                   help="of GPU and host memory a layout must leave free, for what the memory model does not count "
                   "(default: 0.10)")  # fmt: skip


def headroom_of(args: argparse.Namespace) -> float:
    if not 0.0 <= args.memory_headroom < 1.0:
        raise ConfigError("E002", f"--memory-headroom {args.memory_headroom} is not a fraction in [0, 1)",
                          "e.g. --memory-headroom 0.1 keeps 10% of each memory free")  # fmt: skip
    return float(args.memory_headroom)


def _cluster(args: argparse.Namespace) -> Cluster:
    from lumina_ds.planning.hardware import gpu_spec
    from lumina_ds.planning.planner import Cluster

    spec = gpu_spec(args.gpu)
    memory = spec.memory_gib if args.gpu_mem_gb is None else args.gpu_mem_gb
    if args.nodes < 1 or args.gpus_per_node < 1 or memory <= 0:
        raise ConfigError("E002", "--nodes, --gpus-per-node and --gpu-mem-gb must be positive")
    if args.nvme_gb < 0 or args.nvme_gbps <= 0 or args.fs_write_gbps <= 0:
        raise ConfigError("E002", "--nvme-gb must be >= 0, --nvme-gbps and --fs-write-gbps positive")
    return Cluster(args.nodes, args.gpus_per_node, memory, args.cpu_mem_gb, spec.key, headroom_of(args),
                   nvme_gib=args.nvme_gb, nvme_gbps=args.nvme_gbps, nvme_path=args.nvme_path,
                   fs_write_gbps=args.fs_write_gbps)  # fmt: skip


def plan_of(args: argparse.Namespace, run: RunConfig | None = None) -> Plan:
    """`lumina-ds plan`'s answer for its arguments (MemoryPlanError E201/E202 when nothing fits)."""
    from lumina_ds.planning.planner import plan

    run = run or run_of(args, seq_len=args.seq_len)
    return plan(run, _cluster(args), seq_len=args.seq_len, precision=args.precision, mfu=args.mfu)


def fine_tuning_note(args: argparse.Namespace, run: RunConfig) -> str:
    """For a model path: which run is planned (the batch the planner splits comes from it)."""
    from lumina_ds.hf.model_path import YAML_SUFFIXES

    rows = run.train.micro_batch_size * run.train.grad_accum
    if Path(args.model).suffix in YAML_SUFFIXES:
        return f"model of {args.model}, planned as `train --config-file {args.model}` runs it: {rows} rows per GPU"
    return (
        f"model {args.model}, planned as `train --init-from {args.model}` fine-tunes it (all weights, with their "
        f"gradients and AdamW states): {rows} rows per GPU per optimizer step, as `train` has without --preset"
    )


def cmd_plan(args: argparse.Namespace) -> int:
    from lumina_ds.planning.plan_report import format_plan, plan_as_dict

    run = run_of(args, seq_len=args.seq_len)
    result = plan_of(args, run)
    if args.json:
        print(json.dumps(named(plan_as_dict(result), args), indent=2))
        return 0
    if args.model is not None:
        print(fine_tuning_note(args, run))
    print(format_plan(result))
    return 0


def cmd_analyze_memory(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from lumina_ds.distributed.preflight import preflight
    from lumina_ds.planning.memory import estimate_memory, format_breakdown
    from lumina_ds.planning.memory_inputs import Layout, with_bucket_rules

    run = run_of(args, seq_len=args.sequence_length)
    run.distributed.zero_stage, run.distributed.expert_parallel_size = args.zero_stage, args.expert_parallel_size
    run.distributed.moe_backend, run.train.precision = args.moe_backend, args.precision
    run.validate()
    preflight(run, args.gpus)
    if args.activation_checkpointing is not None:
        run.train.activation_checkpointing = args.activation_checkpointing
    elif args.gradient_checkpointing is not None:
        run.train.gradient_checkpointing = args.gradient_checkpointing
    layout = Layout(zero_stage=args.zero_stage, gpus=args.gpus, gpus_per_node=min(args.gpus, args.gpus_per_node),
                    expert_parallel_size=args.expert_parallel_size, micro_batch_size=args.batch_size,
                    seq_len=args.sequence_length or run.seq_len, recompute=run.train.recompute,
                    precision=args.precision, offload_optimizer=args.offload_optimizer,
                    offload_param=args.offload_param)  # fmt: skip
    layout = with_bucket_rules(layout, run.model)
    if args.precision == "auto":
        layout = replace(layout, precision="mixed_bf16")
    estimate = estimate_memory(run.model, layout)
    if args.json:
        print(json.dumps({**subject(args), **estimate.as_dict()}, indent=2))
        return 0
    print(f"{run.preset}: ZeRO-{layout.zero_stage}, {layout.gpus} GPUs, EP {layout.expert_parallel_size}, "
          f"micro-batch {layout.micro_batch_size} x seq {layout.seq_len}, {layout.precision}, "
          f"recompute {layout.recompute}")  # fmt: skip
    print(format_breakdown(estimate))
    return 0


def _plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="fastest ZeRO / expert-parallel / offload / batch layout that fits a cluster")
    _cluster_args(p)
    _json_arg(p)
    p.set_defaults(func=cmd_plan)


def _analyze_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze-memory", help="per-GPU memory breakdown of one layout")
    _preset_arg(p)
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=3, help="ZeRO stage (default: 3)")
    p.add_argument("--batch-size", "--micro-batch-size", dest="batch_size", type=int, default=1,
                   help="rows per GPU per micro-batch (default: 1)")  # fmt: skip
    p.add_argument("--sequence-length", "--seq-len", dest="sequence_length", type=int, default=None,
                   help="tokens per row (default: the preset's, max 4096)")  # fmt: skip
    p.add_argument("--gpus", type=int, default=8, help="GPUs in all (default: 8)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default: 8)")
    p.add_argument("--expert-parallel-size", type=int, default=1, help="experts split over N GPUs (default: 1)")
    p.add_argument("--moe-backend", choices=("autoep", "native"), default="autoep",
                   help="MoE implementation (default: autoep)")  # fmt: skip
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="= --activation-checkpointing full/none (default: the preset's)")  # fmt: skip
    p.add_argument(
        "--activation-checkpointing",
        choices=ACTIVATION_CHECKPOINTING,
        default=None,
        help="what backward recomputes: full, selective (= attention), moe, none (default: the preset's)",
    )
    p.add_argument("--offload-optimizer", action="store_true", help="optimizer states on the host (default: off)")
    p.add_argument("--offload-param", action="store_true", help="ZeRO-3 parameters on the host (default: off)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto = mixed bf16, a GPU run (default: auto)")  # fmt: skip
    _json_arg(p)
    p.set_defaults(func=cmd_analyze_memory)


def register(sub: argparse._SubParsersAction) -> None:
    _estimate_parameters_parser(sub)
    _plan_parser(sub)
    _analyze_parser(sub)
    _ds_config_parser(sub)
    _dry_run_parser(sub)
    _estimate_time_parser(sub)


def cmd_ds_config(args: argparse.Namespace) -> int:
    from lumina_ds.planning.layouts import REFERENCE_CLUSTERS, ds_config_for_plan, layout_for_plan
    from lumina_ds.planning.planner import plan

    run = run_of(args, seq_len=args.seq_len)
    if args.nodes is None and args.model is not None:
        raise ConfigError("E002", "ds-config --model needs --nodes (only a preset has a reference cluster)",
                          f"e.g. lumina-ds ds-config --model {args.model} --nodes 1 --gpus-per-node 8")  # fmt: skip
    cluster = REFERENCE_CLUSTERS[run.preset] if args.nodes is None else _cluster(args)
    result = plan(run, cluster, seq_len=args.seq_len, precision=args.precision, mfu=args.mfu)
    document = ds_config_for_plan(run, result) if args.format == "deepspeed" else layout_for_plan(run, result)
    if args.model is not None and args.format == "layout":
        document = model_layout(document, args, cluster)
    text = json.dumps(document, indent=2) + "\n"
    if args.output is None:
        print(text, end="")
        return 0
    Path(args.output).write_text(text)
    what = "DeepSpeed JSON" if args.format == "deepspeed" else "planned layout"
    print(f"wrote {args.output}: the {what} of {run.preset} on {cluster.describe()}")
    return 0


def model_layout(document: dict[str, Any], args: argparse.Namespace, cluster: Cluster) -> dict[str, Any]:
    """A model's layout file names its path and the command that wrote it (layout_for_plan writes a preset's)."""
    from lumina_ds.planning.layouts import METADATA_KEY

    meta = named(document[METADATA_KEY], args)
    meta["generated_by"] = (f"lumina-ds ds-config --model {args.model} --nodes {cluster.nodes} --gpus-per-node "
                            f"{cluster.gpus_per_node} --gpu-mem-gb {cluster.gpu_mem_gib:g}")  # fmt: skip
    return {**document, METADATA_KEY: meta}


def _ds_config_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ds-config", help="a preset's (or --model's) planned layout (lumina_ds/planning/layouts/) or "
                       "its DeepSpeed JSON (ds_configs/)")  # fmt: skip
    _cluster_args(p, nodes_required=False)
    p.add_argument("--format", choices=("layout", "deepspeed"), default="layout",
                   help="layout: the plan's run-config values and the DeepSpeed keys they do not model, as `train "
                   "--preset` adopts them; deepspeed: the complete DeepSpeed JSON a run of the plan gives DeepSpeed "
                   "on that cluster, as in ds_configs/<preset>.json (default: layout)")  # fmt: skip
    p.add_argument("--output", metavar="FILE", default=None, help="write the JSON to FILE (default: print it)")
    p.set_defaults(func=cmd_ds_config)


def cmd_dry_run(args: argparse.Namespace) -> int:
    from lumina_ds.planning.dry_run import dry_run, format_dry_run

    result = dry_run(run_of(args, seq_len=args.seq_len), _cluster(args), seq_len=args.seq_len,
                     precision=args.precision, mfu=args.mfu)  # fmt: skip
    if args.json:
        print(json.dumps({**subject(args), **result.as_dict()}, indent=2))
        return 0
    print(format_dry_run(result))
    return 0


def cmd_estimate_time(args: argparse.Namespace) -> int:
    from lumina_ds.models.counting import count_parameters
    from lumina_ds.planning.estimate_time import count_tokens, estimate_time

    run = run_of(args, seq_len=args.seq_len)
    seq_len = args.seq_len or run.seq_len
    tokens = count_tokens(args.train_data, tokenizer=args.tokenizer)
    flops = count_parameters(run.model, seq_len=seq_len).flops_per_token
    epochs = args.epochs or run.train.epochs
    est = estimate_time(tokens=tokens.tokens, flops_per_token=flops, epochs=epochs, gpus=args.gpus, gpu=args.gpu,
                        precision=args.precision, mfu=args.mfu)  # fmt: skip
    if args.json:
        fields = {"tokens": est.tokens, "epochs": epochs, "flops_per_token": flops, "total_flops": est.total_flops}
        print(json.dumps({**subject(args), **fields, "seconds": est.seconds, "token_count": tokens.method}))
        return 0
    print(f"{run.preset}: {est.tokens:,.0f} tokens ({tokens.method}) x {epochs} epoch(s)")
    print(f"  {flops:.3e} FLOPs/token (6*N_active + attention at seq {seq_len}) -> {est.total_flops:.3e} FLOPs")
    seconds = f"{est.seconds:.3g}" if est.seconds < 100 else f"{est.seconds:,.0f}"
    when = f"{seconds} s = {est.hours:,.2f} hours = {est.hours / 24:,.2f} days"
    print(f"  {args.gpus} x {args.gpu} at MFU {args.mfu:g}: {when}")
    return 0


def _dry_run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dry-run", help="plan, build on the meta device, pre-flight and DeepSpeed config; no step")
    _cluster_args(p)
    _json_arg(p)
    p.set_defaults(func=cmd_dry_run)


def _estimate_time_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("estimate-time", help="training time from tokens, FLOPs/token, GPUs and an assumed MFU")
    _preset_arg(p)
    p.add_argument("--train-data", required=True, help="JSONL file; tokens estimated from its size (required)")
    p.add_argument(
        "--tokenizer", help="tokenizer.json: measure bytes/token on the first 2000 lines (default: ~4 bytes/token)"
    )
    p.add_argument("--gpus", type=int, required=True, help="GPUs in all (required)")
    _gpu_arg(p)
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default: 0.4)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the data (default: the preset's)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: the preset's, max 4096)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto = bf16 peak (default: auto)")
    _json_arg(p)
    p.set_defaults(func=cmd_estimate_time)


def cmd_estimate_parameters(args: argparse.Namespace) -> int:
    from lumina_ds.models.counting import count_parameters

    run = run_of(args, seq_len=args.seq_len)
    seq_len = args.seq_len or run.seq_len
    count = count_parameters(run.model, seq_len=seq_len)
    if args.json:
        print(json.dumps({**subject(args), **count.as_dict()}))
        return 0
    what = "model" if args.model is not None else "preset"
    print(f"{what} {run.preset}: {count.total:,} parameters, {count.active:,} active per token")
    for name, n in count.by_component.items():
        if n:
            print(f"  {name:<15} {n:>18,}  {100 * n / count.total:5.1f}%")
    print(f"  training FLOPs/token {count.flops_per_token:.3e} (6*N_active + attention at seq {seq_len})")
    return 0


def _estimate_parameters_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("estimate-parameters", help="total and active parameters of a preset (or --model), by component")
    _preset_arg(p, required=False)
    p.add_argument("--seq-len", type=int, default=None,
                   help="sequence length for the FLOPs estimate (default: the preset's, max 4096)")  # fmt: skip
    _json_arg(p)
    p.set_defaults(func=cmd_estimate_parameters)
