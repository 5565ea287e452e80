"""Every recompute mode computes the same losses and gradients as none, and recomputes what it names."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils import checkpoint as torch_checkpoint

from lumina_ds.config.io import load_config
from lumina_ds.config.run import TrainConfig
from lumina_ds.errors import ConfigError
from lumina_ds.models import transformer as transformer_module
from lumina_ds.models.transformer import Transformer
from tests.models.test_transformer import batch, build

MODES = ("full", "attention", "moe")


def run_mode(model: Transformer, mode: str, ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    model.set_recompute(mode)
    out = model(ids, labels=labels)
    out["loss"].backward()
    return {"loss": out["loss"], "aux": out["metrics"]["aux_loss"], "z": out["metrics"]["z_loss"]}


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_gives_the_losses_and_gradients_of_no_recompute(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # layer 0 dense, layer 1 MoE with a shared expert: each sub-block kind goes through the mode
    moe = {"dense_layers": [0], "num_shared_experts": 1, "shared_intermediate_size": 32}
    plain = build(init_std=0.1, num_layers=2, moe=moe).train()
    checked = copy.deepcopy(plain)
    wrapped: list[str] = []
    real = torch_checkpoint.checkpoint

    def spy(fn: object, *args: object, **kwargs: object) -> object:
        assert kwargs.get("use_reentrant") is False  # reentrant checkpoints break ZeRO-3's per-module gathers
        wrapped.append(getattr(fn, "__name__", type(fn).__name__))
        return real(fn, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(transformer_module, "checkpoint", spy)
    ids, labels = batch(batch_size=2, seq_len=12)
    expected = run_mode(plain, "none", ids, labels)
    assert wrapped == []
    got = run_mode(checked, mode, ids, labels)
    names = {"full": "Block", "attention": "attention", "moe": "feed_forward"}
    assert wrapped == [names[mode]] * len(checked.layers)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)
    grads = dict(plain.named_parameters())
    for name, p in checked.named_parameters():
        g0 = grads[name].grad
        assert p.grad is not None and g0 is not None, name
        torch.testing.assert_close(p.grad, g0, rtol=0, atol=1e-6, msg=name)


def test_eval_and_cached_decoding_never_recompute(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build().eval()
    model.set_recompute("attention")
    calls: list[int] = []
    monkeypatch.setattr(transformer_module, "checkpoint", lambda *a, **k: calls.append(1))
    ids, _ = batch(batch_size=1, seq_len=6)
    with torch.no_grad():
        model(ids)
    assert calls == []


def test_selective_means_attention_and_the_old_boolean_is_an_alias() -> None:
    train = TrainConfig(activation_checkpointing="selective")
    assert train.recompute == "attention" and train.gradient_checkpointing
    train.gradient_checkpointing = False
    assert train.activation_checkpointing == "none" and train.recompute == "none"
    train.gradient_checkpointing = True
    assert train.activation_checkpointing == "full"
    with pytest.raises(ConfigError, match="unknown activation_checkpointing"):
        TrainConfig(activation_checkpointing="attn").validate()


def test_a_config_files_mode_wins_over_its_presets(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "config.yaml"
    path.write_text("preset: b1\ntrain:\n  activation_checkpointing: selective\n")  # b1's own mode is full
    assert load_config(path).train.activation_checkpointing == "selective"
    path.write_text("train:\n  gradient_checkpointing: true\n")  # the flag's alias is not a config key
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(path)
