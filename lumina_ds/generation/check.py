"""Generation checks: a fixed (or the user's) set of prompts answered greedily from a checkpoint, written to
`<run dir>/generations.jsonl`; optionally in every precision the device supports, with the token agreement of each
against fp32."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lumina_ds.errors import DataError
from lumina_ds.generation.batched import generate_batch
from lumina_ds.generation.chat import ChatSession, require_utf8
from lumina_ds.generation.loading import InferenceBundle, load_for_inference
from lumina_ds.generation.sampling import SamplingConfig

GENERATIONS_FILE = "generations.jsonl"
DEFAULT_PROMPTS = (
    "Hello! Who are you?",
    "What is the capital of France?",
    "Explain what a mixture-of-experts model is in one sentence.",
    "Write a Python function that returns the square of a number.",
    "List three colours of the rainbow.",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Generation:
    """One greedy answer. tokens_per_s: every reply's tokens over the batched call (prefill included)."""

    prompt: str
    reply: str
    token_ids: list[int]
    tokens: int
    tokens_per_s: float
    precision: str
    agreement: float | None = None  # share of tokens equal to fp32's up to the first difference
    exact_match: bool | None = None


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: one per line, or JSONL lines that are strings or objects with a "prompt" field."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError("E104", f"prompts file not found: {path}", 'one prompt per line, or JSONL {"prompt": ...}')
    prompts = []
    for line_no, line in enumerate(_utf8_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        prompt = _prompt_of(line, path, line_no) if line.lstrip().startswith(("{", '"')) else line.strip()
        prompts.append(require_utf8(prompt, f"{path}:{line_no}: the prompt", _file_hint(path)))  # "\ud800" in JSON
    if not prompts:
        raise DataError("E104", f"{path} holds no prompt", 'one prompt per line, or JSONL {"prompt": ...}')
    return prompts


def _file_hint(path: Path) -> str:
    return f"save {path} as UTF-8 (e.g. `iconv -f latin1 -t utf-8 {path.name} > prompts.utf8.txt`)"


def _utf8_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = data.count(b"\n", 0, exc.start) + 1
        message = f"{path}:{line_no}: the prompt is not valid UTF-8 text: byte 0x{data[exc.start]:02x}"
        raise DataError("E116", message, _file_hint(path)) from None


def _prompt_of(line: str, path: Path, line_no: int) -> str:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(
            "E101", f"{path}:{line_no}: not valid JSON ({exc.msg})", "write one JSON value per line"
        ) from exc
    prompt = value.get("prompt") if isinstance(value, dict) else value
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError("E102", f'{path}:{line_no}: no "prompt" text', 'each line needs {"prompt": "..."}')
    return prompt


def precisions_for(device: torch.device) -> list[str]:
    """fp32 first (the reference), then the lower precisions the device computes in."""
    if device.type != "cuda":
        return ["fp32", "bf16"]
    supported = ["fp32"]
    if torch.cuda.is_bf16_supported():
        supported.append("bf16")
    return [*supported, "fp16"]


def answer(bundle: InferenceBundle, prompts: list[str], *, max_new_tokens: int, precision: str) -> list[Generation]:
    """The prompts answered greedily together (each without history; batched decoding equals each alone), timed."""
    session = ChatSession(bundle, SamplingConfig(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens))
    start = time.perf_counter()
    replies = generate_batch(
        bundle.model, [session.prompt_ids(p) for p in prompts], session.sampling, stop_ids=bundle.tokenizer.stop_ids
    )
    tokens_per_s = sum(len(ids) for ids in replies) / max(time.perf_counter() - start, 1e-9)
    return [
        Generation(prompt, bundle.tokenizer.decode(ids), ids, len(ids), tokens_per_s, precision)
        for prompt, ids in zip(prompts, replies, strict=True)
    ]


def agreement(reference: list[int], other: list[int]) -> float:
    """Tokens equal up to the first difference, over the longer sequence (1.0 only for identical sequences)."""
    longest = max(len(reference), len(other))
    if longest == 0:
        return 1.0
    same = 0
    for a, b in zip(reference, other, strict=False):
        if a != b:
            break
        same += 1
    return same / longest


def compare_to(reference: list[Generation], others: list[Generation]) -> None:
    """Fill in agreement and exact_match of `others` against `reference` (the same prompts in the same order)."""
    for ref, gen in zip(reference, others, strict=True):
        gen.agreement = agreement(ref.token_ids, gen.token_ids)
        gen.exact_match = ref.token_ids == gen.token_ids


def write_generations(path: Path, generations: list[Generation]) -> Path:
    with path.open("w", encoding="utf-8") as file:
        for gen in generations:
            file.write(json.dumps(asdict(gen)) + "\n")
    return path


def run_check(
    checkpoint: str | Path,
    *,
    prompts: list[str],
    max_new_tokens: int,
    compare_precisions: bool,
    device: torch.device,
) -> tuple[list[Generation], Path]:
    """Answer `prompts` from the newest checkpoint under `checkpoint` (fp32; with compare_precisions, also in each
    lower precision of the device); write them to <run dir>/generations.jsonl. -> (generations, that file)."""
    precisions = precisions_for(device) if compare_precisions else ["fp32"]
    by_precision: dict[str, list[Generation]] = {}
    run_dir = None
    for precision in precisions:
        bundle = load_for_inference(checkpoint, device=device, dtype=DTYPES[precision])
        run_dir = bundle.run_dir
        by_precision[precision] = answer(bundle, prompts, max_new_tokens=max_new_tokens, precision=precision)
        if precision != "fp32":
            compare_to(by_precision["fp32"], by_precision[precision])
        del bundle
    assert run_dir is not None
    generations = [gen for gens in by_precision.values() for gen in gens]
    return generations, write_generations(run_dir / GENERATIONS_FILE, generations)


def summary(generations: list[Generation]) -> list[dict[str, Any]]:
    """Per precision: prompts, mean tokens/s, and (below fp32) mean agreement and exact matches."""
    rows = []
    for precision in dict.fromkeys(gen.precision for gen in generations):
        gens = [g for g in generations if g.precision == precision]
        row: dict[str, Any] = {"precision": precision, "prompts": len(gens),
                               "tokens_per_s": sum(g.tokens_per_s for g in gens) / len(gens)}  # fmt: skip
        if gens[0].agreement is not None:
            row["agreement"] = sum(g.agreement or 0.0 for g in gens) / len(gens)
            row["exact_matches"] = sum(bool(g.exact_match) for g in gens)
        rows.append(row)
    return rows


def format_report(generations: list[Generation], path: Path) -> str:
    """The fp32 answers, then one line per precision."""
    lines = [f"{g.prompt!r} -> {g.reply!r} ({g.tokens} tokens)" for g in generations if g.precision == "fp32"]
    for row in summary(generations):
        line = f"{row['precision']}: {row['prompts']} prompts, {row['tokens_per_s']:.1f} tokens/s"
        if "agreement" in row:
            line += f", agreement with fp32 {row['agreement']:.1%}, exact {row['exact_matches']}/{row['prompts']}"
        lines.append(line)
    lines.append(f"-> {path}")
    return "\n".join(lines)
