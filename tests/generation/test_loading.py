"""load_for_inference / save_consolidated round trips and the E303 errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lumina_ds.errors import CheckpointError
from lumina_ds.generation import load_for_inference
from lumina_ds.models.transformer import Transformer
from lumina_ds.run_dir import CHECKPOINTS_DIR, COMPLETE_MARKER, WEIGHTS_FILE, tag_for_step
from lumina_ds.tokenizer import ChatTokenizer
from tests.generation.conftest import make_run_dir
from tests.helpers import save_consolidated

INPUT = torch.tensor([[1, 7, 9, 30, 2, 11, 4]])  # [1, 7]


def _tag_dir(run: Path, step: int = 10) -> Path:
    return run / CHECKPOINTS_DIR / tag_for_step(step)


def _assert_same_logits(a: Transformer, b: Transformer) -> None:
    a.eval()
    with torch.no_grad():
        assert torch.equal(a(INPUT)["logits"], b(INPUT)["logits"])


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_gives_identical_logits(tmp_path: Path, tokenizer: ChatTokenizer, tie: bool) -> None:
    run, model = make_run_dir(tmp_path / "run", tokenizer, tie=tie)
    keys = set(load_file(str(_tag_dir(run) / WEIGHTS_FILE)))
    assert ("lm_head.weight" in keys) is not tie
    for path in (run, run / CHECKPOINTS_DIR, _tag_dir(run)):
        bundle = load_for_inference(path)
        assert bundle.checkpoint_tag == tag_for_step(10)
        assert bundle.run_dir == run
        assert not bundle.model.training
        assert (bundle.model.lm_head.weight is bundle.model.embed.weight) is tie
        _assert_same_logits(model, bundle.model)


def test_newest_complete_tag_wins(run_dir: tuple[Path, Transformer], tokenizer: ChatTokenizer) -> None:
    run, _ = run_dir
    shutil.copytree(_tag_dir(run, 10), _tag_dir(run, 20))
    shutil.copytree(_tag_dir(run, 10), _tag_dir(run, 30))
    (_tag_dir(run, 30) / COMPLETE_MARKER).unlink()  # interrupted save: skipped
    assert load_for_inference(run).checkpoint_tag == tag_for_step(20)


def test_dtype_casts_parameters_but_keeps_rope_in_fp32(run_dir: tuple[Path, Transformer]) -> None:
    model = load_for_inference(run_dir[0], dtype=torch.bfloat16).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope.inv_freq.dtype == torch.float32


def _code(path: Path) -> str:
    with pytest.raises(CheckpointError) as err:
        load_for_inference(path)
    assert err.value.hint
    return f"{err.value.code}: {err.value.message}"


def test_missing_weights_is_e303(run_dir: tuple[Path, Transformer]) -> None:
    run, _ = run_dir
    (_tag_dir(run) / WEIGHTS_FILE).unlink()
    assert _code(run).startswith("E303: consolidated weights not found")


def test_tag_without_complete_marker_is_e303(run_dir: tuple[Path, Transformer]) -> None:
    run, _ = run_dir
    (_tag_dir(run) / COMPLETE_MARKER).unlink()
    assert "incomplete" in _code(_tag_dir(run))
    assert "no complete checkpoint" in _code(run)


@pytest.mark.parametrize("name", ["config.yaml", "tokenizer.json"])
def test_missing_run_files_are_e303(run_dir: tuple[Path, Transformer], name: str) -> None:
    run, _ = run_dir
    (run / name).unlink()
    assert name in _code(run)


def test_nonexistent_path_is_e303(tmp_path: Path) -> None:
    assert _code(tmp_path / "nope").startswith("E303")


def _rewrite_weights(run: Path, edit: object) -> None:
    path = _tag_dir(run) / WEIGHTS_FILE
    state = load_file(str(path))
    edit(state)  # type: ignore[operator]
    save_file(state, str(path))


def test_missing_key_is_named(run_dir: tuple[Path, Transformer]) -> None:
    _rewrite_weights(run_dir[0], lambda s: s.pop("layers.0.attn.q_proj.weight"))
    message = _code(run_dir[0])
    assert "missing keys: layers.0.attn.q_proj.weight" in message


def test_unexpected_and_misshapen_keys_are_named(run_dir: tuple[Path, Transformer]) -> None:
    def edit(state: dict[str, torch.Tensor]) -> None:
        state["bogus.weight"] = torch.zeros(2)
        state["norm.weight"] = torch.zeros(5)

    _rewrite_weights(run_dir[0], edit)
    message = _code(run_dir[0])
    assert "unexpected keys: bogus.weight" in message
    assert "norm.weight (5,) vs model (32,)" in message


def test_corrupt_weights_file_is_e303(run_dir: tuple[Path, Transformer]) -> None:
    (_tag_dir(run_dir[0]) / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    assert _code(run_dir[0]).startswith("E303: cannot read")


def test_save_consolidated_to_explicit_file(tmp_path: Path, run_dir: tuple[Path, Transformer]) -> None:
    target = save_consolidated(run_dir[1], tmp_path / "x" / "weights.safetensors")
    assert target == tmp_path / "x" / "weights.safetensors"
    assert not list(target.parent.glob("*.tmp"))
    assert set(load_file(str(target))) == set(run_dir[1].state_dict()) - {"lm_head.weight"}
