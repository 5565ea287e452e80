"""Learning per token: lumina-ds's model against transformers' Mixtral on the identical batch sequence.

Both models are the same architecture (the HF config comes from lumina_ds.hf.hf_config_from_model), each starts from
its own default initialisation, and both train with the same AdamW (our parameter groups, betas, weight decay,
gradient clipping) and our learning-rate schedule on the same packed batches from our data pipeline and tokenizer.
Transformers gets the document mask as a 4D boolean mask [B, 1, S, S] with the position ids, and its loss is its own
causal-LM loss function given our pre-shifted labels (`shift_labels`), plus its load-balancing loss with the
coefficient that equals ours (HF pools layers and counts top-k picks: 2.0 at uniform routing for top-2; ours is
Switch's per-layer mean: 1.0; so coef_hf = load_balancing_weight / top_k). Our model keeps its router z-loss.

The data: chats asking what a Python standard-library function or class does, answered with its docstring (a fixed
module list, so the same on every machine with the same Python); 1 in 20 goes to the evaluation set.

    python benchmarks/learning.py --preset debug --steps 300 --seeds 3 --init-schemes scaled,normal,depth
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import itertools
import json
import math
import statistics
import sys
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lumina_ds.batch import IGNORE_INDEX, Batch
from lumina_ds.config.presets import get_preset
from lumina_ds.config.run import DataConfig, RunConfig
from lumina_ds.data import sample_texts
from lumina_ds.data.loading.packing import PackedDataset
from lumina_ds.data.loading.pipeline import build_batches, eval_rows, open_sources
from lumina_ds.data.prepare.tokenize import EncodeSettings
from lumina_ds.data.records.sources import parse_train_data
from lumina_ds.models.config import INIT_SCHEMES, ModelConfig
from lumina_ds.models.transformer import Transformer
from lumina_ds.tokenizer import train_bpe_tokenizer
from lumina_ds.training.schedule import schedule_for

# fmt: off
STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "bz2", "calendar", "cmath", "codecs", "collections",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis",
    "email", "enum", "filecmp", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "imaplib", "inspect", "io", "ipaddress",
    "itertools", "json", "keyword", "linecache", "locale", "logging", "lzma", "mailbox", "mimetypes", "netrc",
    "numbers", "operator", "optparse", "pathlib", "pickle", "pickletools", "platform", "plistlib", "poplib",
    "pprint", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex",
    "shutil", "signal", "smtplib", "socket", "sqlite3", "ssl", "statistics", "string", "stringprep", "struct",
    "subprocess", "symtable", "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "token", "tokenize", "tomllib", "trace", "traceback", "tracemalloc", "types", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zlib",
)
# fmt: on
EVAL_EVERY_NTH = 20  # a chat whose name hashes to 0 mod this is held out for evaluation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="debug", help="model, learning rate, warmup and batch size (debug, m70_memory)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per model")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1: each seeds both inits and the data order")
    p.add_argument("--init-schemes", default=None, help=f"comma list of {'/'.join(INIT_SCHEMES)} (default: ours)")
    p.add_argument("--eval-every", type=int, default=50, help="optimizer steps between evaluations (and the last)")
    p.add_argument("--eval-rows", type=int, default=64, help="packed evaluation rows (the first N)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per step (default: the preset's micro batch)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-chats", type=int, default=0, help="use only the first N training chats (0: all)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--no-peer", action="store_true", help="train only our model (compare init schemes)")
    p.add_argument("--output", default=None, help="write every eval loss as JSON here")
    return p.parse_args(argv)


def docstring_chats() -> Iterator[tuple[str, dict[str, Any]]]:
    """(qualified name, chat) for each documented public function, class and method of STDLIB_MODULES."""
    for module_name in STDLIB_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a Python built without it (ssl, sqlite3, ...)
            continue
        with warnings.catch_warnings():  # deprecated aliases (typing.re) warn when their attributes are read
            warnings.simplefilter("ignore", DeprecationWarning)
            chats = list(_module_chats(module_name, module))
        yield from chats


def _module_chats(module_name: str, module: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue
        members = [(name, obj)]
        if inspect.isclass(obj):
            members += [(f"{name}.{m}", v) for m, v in sorted(vars(obj).items()) if not m.startswith("_")]
        for qualname, member in members:
            doc = inspect.getdoc(member) if callable(member) else None
            if doc and len(doc) > 40:
                question = f"What does `{module_name}.{qualname}` do?"
                yield qualname, {"messages": [{"role": "user", "content": question},
                                              {"role": "assistant", "content": doc}]}  # fmt: skip


def write_chats(directory: Path, *, max_chats: int) -> tuple[Path, Path]:
    """train.jsonl and eval.jsonl of docstring chats in `directory`."""
    train, held_out = [], []
    for qualname, chat in docstring_chats():
        (held_out if zlib.crc32(qualname.encode()) % EVAL_EVERY_NTH == 0 else train).append(json.dumps(chat))
    train = train[:max_chats] if max_chats else train
    paths = directory / "train.jsonl", directory / "eval.jsonl"
    for path, lines in zip(paths, (train, held_out), strict=True):
        path.write_text("\n".join(lines) + "\n")
    return paths


@dataclasses.dataclass
class Data:
    run: RunConfig
    encode: EncodeSettings
    train_path: Path
    eval_set: PackedDataset
    pad_id: int

    def batches(self, *, seed: int, count: int) -> list[Batch]:
        """The first `count` training batches for this seed, in our pipeline's order (the epochs repeat as needed)."""
        sources = open_sources(parse_train_data(str(self.train_path)), self.encode, DataConfig(num_workers=0),
                               prepared_dir=self.train_path.parent / "prepared")  # fmt: skip
        packed = build_batches(sources, seed=seed, rank=0, world_size=1, seq_len=self.run.seq_len,
                               pad_id=self.pad_id, micro_batch_size=self.run.train.micro_batch_size,
                               data=DataConfig(num_workers=0))  # fmt: skip
        return list(itertools.islice(packed, count))  # forever: the epochs roll over


def prepare(args: argparse.Namespace, directory: Path) -> Data:
    run = get_preset(args.preset)
    run.data.seq_len = args.seq_len
    run.model.max_seq_len = max(run.model.max_seq_len, args.seq_len)
    run.train.micro_batch_size = args.batch_size or run.train.micro_batch_size
    train_path, eval_path = write_chats(directory, max_chats=args.max_chats)
    tokenizer = train_bpe_tokenizer(sample_texts([train_path], max_bytes=8 << 20), vocab_size=run.model.vocab_size)
    run.model.vocab_size = max(run.model.vocab_size, -(-tokenizer.vocab_size // 64) * 64)
    encode = EncodeSettings.of(tokenizer, truncate_long=True)
    rows, _ = eval_rows(eval_path, encode, seq_len=args.seq_len, pad_id=tokenizer.pad_id)
    rows = dataclasses.replace(rows, **{k: getattr(rows, k)[: args.eval_rows] for k in Batch._fields})
    return Data(run, encode, train_path, PackedDataset(rows), tokenizer.pad_id)


def hf_mixtral(model: ModelConfig) -> nn.Module:
    """transformers' Mixtral of the same architecture with its own default initialisation (from torch's RNG)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from lumina_ds.hf.architectures import hf_config_from_model

    fields = hf_config_from_model(model, arch="MixtralForCausalLM")
    fields.update(use_cache=False, output_router_logits=True, router_aux_loss_coef=hf_aux_coefficient(model))
    config = MixtralConfig(**fields)
    config._attn_implementation = "sdpa"  # consumes the 4D boolean document mask
    config._experts_implementation = "eager"  # its CPU grouped_mm refuses odd expert sizes
    return MixtralForCausalLM(config)


def hf_aux_coefficient(model: ModelConfig) -> float:
    """transformers' router_aux_loss_coef equal to our load_balancing_weight (its loss is top_k x ours at uniform)."""
    return model.moe.load_balancing_weight / model.moe.top_k


LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]  # -> (loss to train on, lm loss)


def lumina_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(batch.input_ids, labels=batch.labels, position_ids=batch.position_ids)
    return out["loss"], out["lm_loss"]


def document_mask_4d(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool, True = may attend: causal within each packed document (a new one where positions restart)."""
    docs = (position_ids == 0).cumsum(dim=-1)  # [B, S]
    S = position_ids.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=position_ids.device).tril()
    return (docs[:, :, None] == docs[:, None, :]).unsqueeze(1) & causal  # [B, 1, S, S]


def mixtral_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    # MixtralForCausalLM.forward without its aux loss, which reads the attention mask as 2D padding [B, S]
    out = model.model(input_ids=batch.input_ids, attention_mask=document_mask_4d(batch.position_ids),
                      position_ids=batch.position_ids, output_router_logits=True)  # fmt: skip
    config = model.config
    logits = model.lm_head(out.last_hidden_state)  # [B, S, V]
    lm = model.loss_function(logits, None, config.vocab_size, shift_labels=batch.labels)  # ours: pre-shifted
    aux = load_balancing_loss_func(out.router_logits, config.num_local_experts, config.num_experts_per_tok)
    return lm + config.router_aux_loss_coef * aux, lm


def optimizer_for(model: nn.Module, run: RunConfig, total_steps: int) -> tuple[Any, Any]:
    """Our recipe: AdamW with weight decay on matrices only, our warmup + cosine schedule."""
    train, params = run.train, [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    opt = torch.optim.AdamW(groups, lr=train.learning_rate, betas=(train.beta1, train.beta2), eps=train.eps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule_for(train, total_steps))


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: LossFn, data: Data) -> float:
    """Mean cross-entropy over every target token of the evaluation rows."""
    model.eval()
    total, count, size = 0.0, 0, data.run.train.micro_batch_size
    for start in range(0, len(data.eval_set), size):
        batch = data.eval_set.batch(range(start, min(start + size, len(data.eval_set))))
        targets = int((batch.labels != IGNORE_INDEX).sum())
        total += float(loss_fn(model, batch)[1]) * targets
        count += targets
    model.train()
    return total / max(count, 1)


def train(model: nn.Module, loss_fn: LossFn, data: Data, batches: list[Batch], eval_every: int) -> dict[int, float]:
    """Eval loss by optimizer step (0 = the initial weights)."""
    opt, scheduler = optimizer_for(model, data.run, len(batches))
    evals = {0: evaluate(model, loss_fn, data)}
    model.train()
    for step, batch in enumerate(batches, start=1):
        loss, _ = loss_fn(model, batch)
        loss.backward()
        if data.run.train.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), data.run.train.max_grad_norm)
        opt.step()
        scheduler.step()
        opt.zero_grad(set_to_none=True)
        if step % eval_every == 0 or step == len(batches):
            evals[step] = evaluate(model, loss_fn, data)
    return evals


def run_seed(data: Data, seed: int, schemes: list[str], args: argparse.Namespace) -> dict[str, dict[int, float]]:
    """Eval curves of our model under each init scheme and of transformers' Mixtral, on one batch sequence."""
    batches = data.batches(seed=seed, count=args.steps)
    curves = {}
    for scheme in schemes:
        torch.manual_seed(seed)
        model = Transformer(dataclasses.replace(data.run.model, init_scheme=scheme))
        curves[f"lumina[{scheme}]"] = train(model, lumina_loss, data, batches, args.eval_every)
    if not args.no_peer:
        torch.manual_seed(seed)
        curves["transformers"] = train(hf_mixtral(data.run.model), mixtral_loss, data, batches, args.eval_every)
    return curves


def check_same_function(data: Data, directory: Path) -> float:
    """Max |logit difference| of our model and transformers' loaded with its weights (ours_to_hf), on an evaluation
    batch through the 4D document mask: the harness feeds both models the same computation."""
    from transformers import MixtralForCausalLM

    from lumina_ds.hf.architectures import hf_config_from_model
    from lumina_ds.hf.weights import ours_to_hf
    from lumina_ds.run_dir import write_shards

    torch.manual_seed(0)
    ours = Transformer(data.run.model).eval()
    state = ours.state_dict()
    model_dir = directory / "hf"
    model_dir.mkdir()
    arch = "MixtralForCausalLM"
    write_shards(ours_to_hf(data.run.model, arch, list(state), state.__getitem__), model_dir, max_shard_bytes=1 << 32)
    (model_dir / "config.json").write_text(json.dumps(hf_config_from_model(data.run.model, arch=arch)))
    theirs = MixtralForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, experts_implementation="eager")
    batch = data.eval_set.batch(range(min(2, len(data.eval_set))))
    with torch.no_grad():
        expected = ours(batch.input_ids, position_ids=batch.position_ids)["logits"]
        got = theirs.eval()(input_ids=batch.input_ids, attention_mask=document_mask_4d(batch.position_ids),
                            position_ids=batch.position_ids).logits  # fmt: skip
    return float((expected - got).abs().max())


def summarize(results: list[dict[str, dict[int, float]]]) -> list[str]:
    """Lines: eval loss per checkpoint (mean ± std over seeds) and each scheme's final gap against transformers."""
    names = list(results[0])
    steps = sorted(results[0][names[0]])
    lines = ["step  " + "  ".join(f"{name:>22}" for name in names)]
    for step in steps:
        cells = [mean_std([r[name][step] for r in results]) for name in names]
        lines.append(f"{step:>4}  " + "  ".join(f"{cell:>22}" for cell in cells))
    return lines


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {spread:.4f}"


def gap_line(results: list[dict[str, dict[int, float]]], name: str) -> str:
    """Relative gap of the final eval loss (seed means), with the paired t of the per-seed differences."""
    last = max(results[0][name])
    ours = [r[name][last] for r in results]
    peer = [r["transformers"][last] for r in results]
    gap = 100 * (statistics.fmean(ours) / statistics.fmean(peer) - 1)
    diffs = [a - b for a, b in zip(ours, peer, strict=True)]
    t = ""
    if len(diffs) > 1 and statistics.stdev(diffs) > 0:
        t = f", paired diff {statistics.fmean(diffs):+.4f} ± {statistics.stdev(diffs):.4f} nats, "
        t += f"t = {statistics.fmean(diffs) / (statistics.stdev(diffs) / math.sqrt(len(diffs))):+.1f}"
    return f"{name}: {gap:+.2f}%{t}"


def main(argv: list[str] | None = None) -> list[dict[str, dict[int, float]]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    schemes = args.init_schemes.split(",") if args.init_schemes else [ModelConfig().init_scheme]
    unknown = [s for s in schemes if s not in INIT_SCHEMES]
    if unknown or args.seeds < 1 or args.steps < 1:
        sys.exit(f"--init-schemes takes {', '.join(INIT_SCHEMES)} (got {unknown}); --seeds, --steps >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare(args, Path(tmp))
        model = data.run.model
        print(f"{args.preset}: h{model.hidden_size} L{model.num_layers} E{model.moe.num_experts} top-{model.moe.top_k} "
              f"vocab {model.vocab_size}, {args.steps} steps of {data.run.train.micro_batch_size}x{args.seq_len}, "
              f"lr {data.run.train.learning_rate:g}, {len(data.eval_set)} eval rows, "
              f"transformers router_aux_loss_coef {hf_aux_coefficient(model):g}", flush=True)  # fmt: skip
        if not args.no_peer:
            print(f"same weights, max |logit diff| lumina vs transformers: {check_same_function(data, Path(tmp)):.1e}")
        results = []
        for seed in range(args.seeds):
            results.append(run_seed(data, seed, schemes, args))
            finals = {name: curve[max(curve)] for name, curve in results[-1].items()}
            print(f"seed {seed}: " + ", ".join(f"{n} {v:.4f}" for n, v in finals.items()), flush=True)
    print("\n".join(summarize(results)))
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    if not args.no_peer:
        gaps = [gap_line(results, f"lumina[{scheme}]") for scheme in schemes]
        print("\n".join(f"  {line}" for line in gaps))
        gap = gaps[0].split(": ", 1)[1].split(",")[0]
        print(f"eval loss gap lumina vs transformers: {gap} ({args.seeds} seeds)")
    return results


if __name__ == "__main__":
    main()
