"""Load a trained model for inference from a run dir / checkpoints dir / tag dir, and write consolidated weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lumina_ds.config.io import load_config
from lumina_ds.config.run import RunConfig
from lumina_ds.errors import CheckpointError
from lumina_ds.models.transformer import Transformer
from lumina_ds.run_dir import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    resolve_checkpoint,
    run_dir_of,
    weights_files,
)
from lumina_ds.tokenizer import ChatTokenizer

TIED_KEY = "lm_head.weight"  # not in the weights of a tied model (safetensors rejects shared storage)
MAX_KEYS_IN_MESSAGE = 8


@dataclass
class InferenceBundle:
    """Everything chat needs: the model in eval mode, the run's config and tokenizer, and which tag was loaded."""

    model: Transformer
    config: RunConfig
    tokenizer: ChatTokenizer
    checkpoint_tag: str
    run_dir: Path


def _is_tied(model: nn.Module) -> bool:
    lm_head, embed = getattr(model, "lm_head", None), getattr(model, "embed", None)
    return lm_head is not None and embed is not None and lm_head.weight is embed.weight


def _require(path: Path, what: str, hint: str) -> Path:
    if not path.is_file():
        raise CheckpointError("E303", f"{what} not found: {path}", hint)
    return path


def _short(keys: list[str]) -> str:
    more = len(keys) - MAX_KEYS_IN_MESSAGE
    return ", ".join(keys[:MAX_KEYS_IN_MESSAGE]) + (f" (+{more} more)" if more > 0 else "")


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Strict key and shape check; only a tied lm_head.weight may be absent. Raises E303 naming the bad keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state) - ({TIED_KEY} if _is_tied(model) else set()))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    problems = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short(unexpected)}")
    if wrong:
        shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong]
        problems.append(f"shape mismatches: {_short(shapes)}")
    if problems:
        raise CheckpointError(
            "E303",
            f"weights in {source} do not match the model built from config.yaml; " + "; ".join(problems),
            "the checkpoint and config.yaml must come from the same run; do not edit config.yaml's model section",
        )


def _read_weights(paths: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                "E303", f"cannot read {path}: {exc}", "the file is corrupt or truncated; load an earlier checkpoint tag"
            ) from exc
    return state


def _load_tokenizer(run_dir: Path, model_vocab: int) -> ChatTokenizer:
    path = _require(run_dir / TOKENIZER_FILE, "tokenizer", f"copy the run's {TOKENIZER_FILE} into {run_dir}")
    tokenizer = ChatTokenizer.from_file(path)
    if tokenizer.vocab_size > model_vocab:
        raise CheckpointError(
            "E303",
            f"{path} has {tokenizer.vocab_size} ids but the model's vocab_size is {model_vocab}",
            "use the tokenizer.json the run trained with",
        )
    return tokenizer


def load_for_inference(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> InferenceBundle:
    """Load the newest complete checkpoint under `path` (a run dir, its checkpoints/ dir, or one tag dir).

    config.yaml and tokenizer.json come from the run dir, weights from `<tag>/model.safetensors` (or its shards).
    Parameters are cast to dtype; RoPE frequencies stay float32.
    """
    checkpoints_dir, tag = resolve_checkpoint(path)
    run_dir = run_dir_of(checkpoints_dir)
    config = load_config(_require(run_dir / CONFIG_FILE, "run config", f"{run_dir} must hold the run's config.yaml"))
    weights = weights_files(checkpoints_dir / tag)
    tokenizer = _load_tokenizer(run_dir, config.model.vocab_size)
    model = Transformer(config.model)
    state = _read_weights(weights)
    check_state_dict(model, state, weights[0].parent)
    model.load_state_dict(state, strict=False)  # strictness checked above (tied lm_head may be absent)
    model.to(device)
    for param in model.parameters():
        param.data = param.data.to(dtype)
    model.eval()
    return InferenceBundle(model=model, config=config, tokenizer=tokenizer, checkpoint_tag=tag, run_dir=run_dir)
