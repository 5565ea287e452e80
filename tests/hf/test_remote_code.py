"""A model directory whose config.json has `auto_map` (remote code, what `trust_remote_code=True` would run): the code
is never run, and import-hf and --init-from say so in one warning naming the entries, once per directory and run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lumina_ds.cli import main
from lumina_ds.hf.source import open_model_source
from tests.data.hf_templates import TEXTS, family_tokenizer

pytest.importorskip("transformers")

ARCH = "LlamaForCausalLM"
AUTO_MAP = {"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomLM"}


def tiny_llama(directory: Path, **extra: Any) -> Path:
    """A tiny Llama as transformers saves it, with a 120-id tokenizer.json and `extra` keys added to config.json."""
    from tests.hf.tiny_models import hf_config, hf_model, saved

    saved(hf_model(ARCH, hf_config(ARCH, vocab_size=160)), directory)
    family_tokenizer("metaspace", ["<s>", "</s>"], TEXTS, vocab_size=120).save(str(directory / "tokenizer.json"))
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **extra}))
    return directory


def warnings_in(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("warning:") and "auto_map" in line]


def test_import_of_a_model_with_auto_map_warns_that_its_code_was_not_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_llama(tmp_path / "custom", auto_map=AUTO_MAP)
    assert main(["import-hf", str(model), "--output", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    [warning] = warnings_in(out)
    assert "AutoConfig: configuration_custom.CustomConfig" in warning
    assert "AutoModelForCausalLM: modeling_custom.CustomLM" in warning
    assert "not run" in warning and f"its own {ARCH} (config.json's architectures)" in warning
    assert "may not match" in warning
    assert out.index(warning) < out.index(f"imported {model}")  # then the import's own lines, as without auto_map


def test_import_of_a_plain_model_prints_no_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_llama(tmp_path / "plain")
    assert main(["import-hf", str(model), "--output", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert f"imported {model}" in out and not warnings_in(out) and "warning:" not in out


def test_init_from_warns_on_the_rank_that_announces_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lumina_ds.cli.train import adopt_init_source
    from lumina_ds.config.presets import get_preset

    model = tiny_llama(tmp_path / "custom", auto_map={"AutoModelForCausalLM": "modeling_custom.CustomLM"})
    for announce in (False, True):  # rank 1 of 2, then rank 0
        run = get_preset("debug")
        run.checkpoint.init_from = str(model)
        adopt_init_source(run, set(), announce=announce)
        assert run.model == open_model_source(model).model
        warnings = warnings_in(capsys.readouterr().out)
        assert len(warnings) == int(announce)
    assert "AutoModelForCausalLM: modeling_custom.CustomLM" in warnings[0] and "not run" in warnings[0]
