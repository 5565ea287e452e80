"""What a resume checks against the tag it resumes, before anything in the run directory changes: the tokenizer it was
trained with, the model architecture (named field by field, with the flag that sets it), and what DeepSpeed can carry
across a change of ZeRO stage, processes or expert parallelism (training/elastic.py). The data position is checked
by the data pipeline itself (`PackedBatches.check_resumable`), once the data is open.

Each tag records its tokenizer (`lumina_state/tokenizer/tokenizer.json`, with a model's chat template files beside
it, and its identity in `trainer.json`): a run directory whose tokenizer.json is missing or unreadable gets it back
from the tag, and a resume never trains a new one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lumina_ds.config.io import config_to_dict
from lumina_ds.config.run import RunConfig
from lumina_ds.errors import CheckpointError, LuminaError
from lumina_ds.tokenizer import ChatTokenizer
from lumina_ds.training.checkpoint_state import TOKENIZER_COPY, load_trainer_state

Log = Callable[[str], None]

# model fields that are set by a flag of their own (the others come from --preset or --config-file)
MODEL_FLAGS = {
    "moe.num_experts": "--num-experts",
    "moe.top_k": "--top-k",
    "moe.capacity_factor": "--capacity-factor",
    "moe.load_balancing_weight": "--load-balancing-weight",
    "moe.router_z_loss_weight": "--router-z-loss-weight",
    "attention_backend": "--attention-backend",
    "init_scheme": "--init-scheme",
}
# model fields a resumed run may change: none of them shapes the weights or what the model computes from them
NOT_ARCHITECTURE = ("attention_backend", "init_scheme", "moe.load_balancing_weight", "moe.router_z_loss_weight")


def tag_tokenizer(tag_dir: Path) -> ChatTokenizer:
    """The tokenizer a tag was trained with, from its own (verified) copy."""
    return ChatTokenizer.from_file(tag_dir / TOKENIZER_COPY)


def resume_tokenizer(own: Path, tag_dir: Path, *, log: Log) -> ChatTokenizer:
    """The run directory's tokenizer for a resume without --tokenizer: its tokenizer.json, or the tag's copy when that
    file is missing or unreadable (the run dir gets it back once the resume is accepted). Never a new one."""
    if not own.exists():
        log(f"resume: {own} is missing: using {tag_dir.name}'s tokenizer ({tag_dir / TOKENIZER_COPY})")
        return tag_tokenizer(tag_dir)
    try:
        return ChatTokenizer.from_file(own)
    except LuminaError as exc:
        log(f"warning: {own} cannot be read ({exc.message}): using the tokenizer {tag_dir.name} was trained with "
            f"({tag_dir / TOKENIZER_COPY}); the unreadable file is kept beside it")  # fmt: skip
        return tag_tokenizer(tag_dir)


def check_tokenizer(saved: dict[str, Any], tokenizer: ChatTokenizer, source: str, tag_dir: Path) -> None:
    """E303 when the run's tokenizer is not the one the tag was trained with (its token ids would mean other text)."""
    if tokenizer.identity() == saved["identity"]:
        return
    raise CheckpointError(
        "E303",
        f"checkpoint {tag_dir.name} was trained with another tokenizer (vocab {saved['vocab_size']:,}, identity "
        f"{saved['identity'][:12]}) than {source} (vocab {tokenizer.vocab_size:,}, identity "
        f"{tokenizer.identity()[:12]}): its token ids would mean other text",
        f"resume with the checkpoint's tokenizer (drop --tokenizer, or pass --tokenizer {tag_dir / TOKENIZER_COPY}); "
        "to train with another tokenizer, start a new run (another --experiment-name)",
    )


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def model_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, saved value, this run's value) for every model field that differs."""
    before, after = _flat(saved), _flat(now)
    return [(name, before.get(name), after.get(name)) for name in sorted(before.keys() | after.keys())
            if before.get(name) != after.get(name)]  # fmt: skip


def check_architecture(saved_config: dict[str, Any], run: RunConfig, tag_dir: Path, *, log: Log) -> None:
    """E303 naming each architecture field that differs from the tag's (with the flag that sets it); the fields that
    are not the architecture follow this run's flags, one line each."""
    changes = model_changes(saved_config["model"], config_to_dict(run.model))
    for name, old, new in changes:
        if name in NOT_ARCHITECTURE:
            log(f"resume: model.{name}: {old} -> {new}")
    differing = [(n, old, new) for n, old, new in changes if n not in NOT_ARCHITECTURE]
    if not differing:
        return
    fields = "; ".join(f"model.{n} {old} -> {new} ({MODEL_FLAGS.get(n, '--preset/--config-file')})"
                       for n, old, new in differing)  # fmt: skip
    raise CheckpointError(
        "E303",
        f"checkpoint {tag_dir.name} was trained with another model architecture: {fields}",
        "resume with the architecture that saved it (drop the flags named; the tag's lumina_state/trainer.json and "
        "the run's config.yaml hold it), or start a new run (another --experiment-name)",
    )


def saved_state(tag_dir: Path) -> dict[str, Any]:
    """The run config and tokenizer record a verified tag was saved with (its trainer.json)."""
    state = load_trainer_state(tag_dir)
    if "tokenizer" not in state:
        raise CheckpointError("E303", f"checkpoint {tag_dir.name} records no tokenizer (lumina_state/trainer.json)",
                              "resume from a tag saved by this version of lumina-ds, or start afresh")  # fmt: skip
    return state
