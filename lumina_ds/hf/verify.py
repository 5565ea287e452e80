"""An export is checked before it is called done: transformers loads it and its logits must equal ours, and what
rounding to the export's dtype cost is measured against the checkpoint as stored, never against a rounded copy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lumina_ds.errors import CheckpointError
from lumina_ds.hf.source import ModelSource
from lumina_ds.models.transformer import Transformer
from lumina_ds.tokenizer import ChatTokenizer, Message

TOLERANCE = 1e-4  # max |logit difference| in fp32
PROBE = (
    Message("system", "You answer briefly."),
    Message("user", "Name three prime numbers, then explain why 1 is not one."),
    Message("assistant", "2, 3 and 5. A prime has exactly two divisors; 1 has one."),
    Message("user", "Und auf Deutsch? ✓"),
)


@dataclass(frozen=True)
class Verification:
    """Two figures on the probe batch, both max |logit difference| in fp32. They are kept apart because only the
    conversion can be wrong: the rounding is the price of the dtype chosen, and a user must see it."""

    max_abs_diff: float  # the conversion error: transformers on the export vs our model with the same rounded weights
    tokens: int  # probe tokens compared (batch x length)
    rounding_loss: float = 0.0  # our model with the weights rounded to the export dtype vs as the checkpoint stores

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= TOLERANCE


def probe_batch(tokenizer: ChatTokenizer, *, vocab_size: int, max_len: int) -> torch.Tensor:
    """[2, S]: a chat prompt as the template renders it, and ids spread over the whole vocabulary."""
    chat = tokenizer.encode_prompt(list(PROBE))[:max_len]
    spread = torch.linspace(0, vocab_size - 1, steps=len(chat)).round().long().flip(0)
    return torch.stack([torch.tensor(chat, dtype=torch.long), spread])  # [2, S]


def stored_model(source: ModelSource) -> Transformer:
    """Our model in fp32 with the weights exactly as the checkpoint stores them (fp32 holds bf16 and fp16 exactly)."""
    model = Transformer(source.model)
    state = {name: source.read(name).float() for name in source.names}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model.eval()


def round_weights(model: Transformer, dtype: torch.dtype) -> bool:
    """Round every weight to `dtype` in place, kept in fp32 as transformers' fp32 load reads the export; whether any
    weight changed (none does when `dtype` holds what is stored)."""
    changed = False
    with torch.no_grad():
        for param in model.parameters():
            rounded = param.to(dtype).float()
            changed = changed or not torch.equal(rounded, param)
            param.copy_(rounded)
    return changed


def _load_export(out_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        # eager experts: transformers' plain per-expert loop (its grouped_mm kernel needs 16-byte strides on CPU)
        return AutoModelForCausalLM.from_pretrained(
            str(out_dir), dtype=torch.float32, experts_implementation="eager"
        ).eval()
    except Exception as exc:  # transformers raises many types for a config or weights it cannot read
        raise CheckpointError(
            "E306",
            f"transformers cannot load the export in {out_dir}: {exc}",
            "report this with the run's config.yaml; the export is left in place",
        ) from exc


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def verify_export(out_dir: Path, source: ModelSource, tokenizer: ChatTokenizer, *, dtype: torch.dtype) -> Verification:
    """Load `out_dir` with transformers (fp32) and compare its logits on a probe batch with our model's: with the
    weights as stored (the rounding loss of `dtype`) and rounded to `dtype` (the conversion error)."""
    theirs = _load_export(out_dir)
    ours = stored_model(source)
    ids = probe_batch(tokenizer, vocab_size=source.model.vocab_size, max_len=min(64, source.model.max_seq_len))
    with torch.no_grad():
        stored = ours(ids)["logits"]  # [2, S, V]
        rounded = ours(ids)["logits"] if round_weights(ours, dtype) else stored
        got = theirs(input_ids=ids).logits  # [2, S, V]
    return Verification(_max_diff(rounded, got), ids.numel(), rounding_loss=_max_diff(rounded, stored))


def why_not_verified(source: ModelSource) -> str | None:
    """Why this machine cannot verify the export (None: it can): transformers missing, or too little free host
    memory for the two fp32 copies of the model the check compares (ours is rounded in place, not copied)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed (pip install lumina-ds[hf])"
    import psutil

    from lumina_ds.models.counting import count_parameters

    needed = 2 * 4 * count_parameters(source.model).total
    available = psutil.virtual_memory().available
    if needed > 0.9 * available:
        return f"it needs {needed / 1e9:.1f} GB of host memory for two fp32 copies, {available / 1e9:.1f} GB is free"
    return None
