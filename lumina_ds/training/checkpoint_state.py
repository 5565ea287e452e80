"""Our part of a checkpoint, as JSON (never a pickle): each rank's data position and RNG streams, and rank 0's
trainer state, train module state and run config. DeepSpeed's files hold only what DeepSpeed owns."""

from __future__ import annotations

import base64
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lumina_ds.errors import CheckpointError
from lumina_ds.run_dir import TOKENIZER_FILE
from lumina_ds.tokenizer import ChatTokenizer

STATE_DIR = "lumina_state"
TRAINER_FILE = "trainer.json"
TOKENIZER_COPY = f"{STATE_DIR}/tokenizer/{TOKENIZER_FILE}"  # the tokenizer a tag was trained with


@dataclass
class Resumed:
    """What a checkpoint gives back to the run: the trainer's and the train module's state, this rank's data position,
    the saved run config."""

    tag_dir: Path
    trainer: dict[str, Any]
    module: dict[str, Any]
    data: dict[str, Any]
    config: dict[str, Any]


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.json"


def _tensor_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _b64_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states as plain JSON values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _tensor_b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = _tensor_b64(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_b64_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_b64_tensor(state["cuda"]))


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Written whole and fsynced before the tag is marked complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError("E303", f"cannot read {path}: {exc}", "resume from an earlier tag") from exc
    if not isinstance(data, dict):
        raise CheckpointError("E303", f"{path} does not hold a JSON object", "resume from an earlier tag")
    return data


def save_rank_state(tag_dir: Path, *, rank: int, world_size: int, data: dict[str, Any]) -> None:
    """This rank's data position (each rank's differs) and RNG streams."""
    write_json(tag_dir / STATE_DIR / rank_file(rank), {"rank": rank, "world_size": world_size, "data": data,
                                                       "rng": rng_state()})  # fmt: skip


def save_trainer_state(
    tag_dir: Path,
    *,
    trainer: dict[str, Any],
    module: dict[str, Any],
    config: dict[str, Any],
    tokenizer: ChatTokenizer | None = None,
) -> None:
    """Rank 0's state; with the tokenizer the run trains with, its copy beside it and its identity in the record."""
    state = {"trainer": trainer, "module": module, "config": config}
    if tokenizer is not None:
        tokenizer.save(tag_dir / TOKENIZER_COPY)  # with a model's chat template files beside it
        state["tokenizer"] = {"identity": tokenizer.identity(), "vocab_size": tokenizer.vocab_size,
                              "file": TOKENIZER_COPY}  # fmt: skip
    write_json(tag_dir / STATE_DIR / TRAINER_FILE, state)


def load_rank_state(tag_dir: Path, *, rank: int) -> dict[str, Any]:
    state = read_json(tag_dir / STATE_DIR / rank_file(rank))
    if state.get("rank") != rank:
        raise CheckpointError("E303", f"{tag_dir} holds rank {state.get('rank')}'s state where rank {rank}'s belongs")
    return state


def load_trainer_state(tag_dir: Path) -> dict[str, Any]:
    return read_json(tag_dir / STATE_DIR / TRAINER_FILE)


def read_resumed(tag_dir: Path, *, rank: int) -> Resumed:
    """Our state of a tag, for this rank (whose RNG streams are set from it)."""
    own = load_rank_state(tag_dir, rank=rank)
    set_rng_state(own["rng"])
    saved = load_trainer_state(tag_dir)
    return Resumed(tag_dir, saved["trainer"], saved["module"], own["data"], saved["config"])
