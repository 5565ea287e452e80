"""Fixtures: a tiny tokenizer, a tiny MoE model, a fake run dir, and a scripted model that says known text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lumina_ds.config import RunConfig, get_preset, save_config
from lumina_ds.generation import InferenceBundle
from lumina_ds.models.attention import LayerKVCache
from lumina_ds.models.config import ModelConfig, MoEConfig
from lumina_ds.models.transformer import Transformer
from lumina_ds.run_dir import CHECKPOINTS_DIR, COMPLETE_MARKER, tag_for_step
from lumina_ds.tokenizer import ChatTokenizer, train_bpe_tokenizer
from tests.helpers import save_consolidated

TEXTS = ["hello there, how are you?", "I am fine, thank you.", "the quick brown fox jumps over the lazy dog"] * 5


@pytest.fixture(scope="session")
def tokenizer() -> ChatTokenizer:
    return train_bpe_tokenizer(TEXTS, vocab_size=300)


def tiny_model_config(vocab_size: int, *, moe_every: int = 2, **overrides: object) -> ModelConfig:
    fields: dict[str, object] = dict(
        vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
        max_seq_len=96, init_std=0.2,
        moe=MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=32, moe_every=moe_every),
    )  # fmt: skip
    fields.update(overrides)
    return ModelConfig(**fields)  # type: ignore[arg-type]


def make_run_dir(root: Path, tokenizer: ChatTokenizer, *, tie: bool = True, step: int = 10) -> tuple[Path, Transformer]:
    """A run dir as training writes it: config.yaml, tokenizer.json, checkpoints/step_XXXXXXXX/{weights, marker}."""
    torch.manual_seed(0)
    config = get_preset("debug")
    config.model = tiny_model_config(tokenizer.vocab_size, tie_embeddings=tie)
    model = Transformer(config.model)
    root.mkdir(parents=True, exist_ok=True)
    save_config(config, root / "config.yaml")
    tokenizer.save(root / "tokenizer.json")
    tag_dir = root / CHECKPOINTS_DIR / tag_for_step(step)
    save_consolidated(model, tag_dir)
    (tag_dir / COMPLETE_MARKER).write_text(json.dumps({"step": step}))
    return root, model


@pytest.fixture
def run_dir(tmp_path: Path, tokenizer: ChatTokenizer) -> tuple[Path, Transformer]:
    return make_run_dir(tmp_path / "run1", tokenizer)


class ScriptedModel(nn.Module):
    """Quacks like Transformer for generate(): the t-th decoding step puts all mass on script[t] (then repeats the
    last id). Counts the tokens it is fed, to prove the prefix is not recomputed, and keeps each call's ids."""

    def __init__(self, config: ModelConfig, script: list[int]) -> None:
        super().__init__()
        self.config = config
        self.script = script
        self.dummy = nn.Parameter(torch.zeros(1))
        self.norm = nn.Identity()  # generate() hooks the final norm to keep the last position only
        self.fed_tokens = 0
        self.steps = 0
        self.inputs: list[list[int]] = []  # row 0 of each forward's input_ids: [0] is the prompt prefilled

    def new_kv_cache(self) -> list[LayerKVCache]:
        return [LayerKVCache()]

    def forward(self, input_ids: torch.Tensor, kv_cache: list[LayerKVCache] | None = None) -> dict[str, torch.Tensor]:
        B, S = input_ids.shape
        self.fed_tokens += S
        self.inputs.append(input_ids[0].tolist())
        target = self.script[min(self.steps, len(self.script) - 1)]
        self.steps += 1
        logits = torch.full((B, S, self.config.vocab_size), -10.0)  # [B, S, V]
        logits[:, -1, target] = 10.0
        return {"logits": logits}


def scripted_bundle(tokenizer: ChatTokenizer, replies: list[str]) -> tuple[InferenceBundle, ScriptedModel]:
    """A bundle whose model answers each reply in turn (then END); replies are given as text."""
    from lumina_ds.tokenizer import END

    end = tokenizer.token_id(END)
    script = [t for reply in replies for t in [*tokenizer.encode(reply), end]]
    config = RunConfig(preset="debug", model=tiny_model_config(tokenizer.vocab_size, max_seq_len=4096))
    model = ScriptedModel(config.model, script)
    bundle = InferenceBundle(model, config, tokenizer, "step_00000010", Path("runs/fake"))  # type: ignore[arg-type]
    return bundle, model
