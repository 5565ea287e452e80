"""Published config.json files (the keys they state, as on the hub; examples/published_configs/) at full size, on the
meta device: each imports, its parameter count equals transformers' model of the same file, and every tensor of
transformers' model is mapped by name and shape (nothing allocated, nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lumina_ds.hf.architectures import model_config_from_hf
from lumina_ds.hf.weights import hf_to_ours, our_parameter_shapes
from lumina_ds.models.counting import count_parameters

transformers = pytest.importorskip("transformers")

# examples/published_configs/<model>/config.json: the files as published (`plan --model` and the README's table read
# them too)
PUBLISHED_DIR = Path(__file__).resolve().parents[2] / "examples" / "published_configs"
PUBLISHED: dict[str, dict[str, Any]] = {
    path.parent.name: json.loads(path.read_text()) for path in sorted(PUBLISHED_DIR.glob("*/config.json"))
}


def test_the_eight_published_configs_are_shipped() -> None:
    assert len(PUBLISHED) == 8 and {"Qwen3-30B-A3B", "Mixtral-8x7B-v0.1", "Llama-3.1-8B"} <= PUBLISHED.keys()


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_config_imports_with_transformers_parameter_count_and_tensors(name: str) -> None:
    config = PUBLISHED[name]
    ours = model_config_from_hf(config).model
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    assert count_parameters(ours).total == sum(p.numel() for p in theirs.parameters())
    state = theirs.state_dict()  # transformers 5's in-memory layout: fused experts
    shapes = {key: list(tensor.shape) for key, tensor in state.items()}
    names, _ = hf_to_ours(ours, config["architectures"][0], list(state), state.__getitem__, hf_shapes=shapes)
    assert names == list(our_parameter_shapes(ours))  # every one of ours, from a tensor of the right shape
