"""The CLI for people: every flag shows its default, LuminaAI's spellings get their equivalent, mistakes get codes."""

from __future__ import annotations

import argparse

import pytest

from lumina_ds.cli import build_parser, main
from lumina_ds.cli.luminaai import LUMINAAI_FLAGS
from lumina_ds.cli.train_flags import FLAG_GROUPS, default_text
from lumina_ds.config.presets import PRESETS
from lumina_ds.monitor.callbacks import format_log_line


def subparsers(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[f"{prefix}{name}"] = sub
                found.update(subparsers(sub, f"{prefix}{name} "))
    return found


def test_every_flag_of_every_command_has_help_with_its_default() -> None:
    missing = []
    for command, parser in subparsers(build_parser()).items():
        for action in parser._actions:
            if not action.option_strings or action.help in (None, argparse.SUPPRESS) or action.dest == "help":
                continue
            if "default" not in action.help and "required" not in action.help:
                missing.append(f"{command} {action.option_strings[0]}")
    assert missing == []


def test_train_defaults_name_the_preset_where_presets_differ() -> None:
    flags = {flag.dest: flag for flags in FLAG_GROUPS.values() for flag in flags}
    assert default_text(flags["epochs"]) == "3"  # no preset changes it
    assert default_text(flags["learning_rate"]) == "the preset's; debug: 0.003"
    assert default_text(flags["gradient_checkpointing"]) == "the preset's; debug: off"
    help_text = subparsers(build_parser())["train"].format_help()
    assert "peak learning rate (default: the preset's; debug: 0.003)" in " ".join(help_text.split())


@pytest.mark.parametrize("flag", sorted(LUMINAAI_FLAGS))
def test_each_luminaai_spelling_gets_its_mapping(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", flag]) == 1
    err = capsys.readouterr().err
    assert "[E002]" in err and f"{flag} (LuminaAI) -> {LUMINAAI_FLAGS[flag]}" in err


def test_luminaai_action_flags_without_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--validate-data", "x.jsonl", "--create-report"]) == 1
    err = capsys.readouterr().err
    assert "--validate-data (LuminaAI) -> lumina-ds validate-data FILE" in err
    assert "--create-report (LuminaAI)" not in err  # validate-data takes it: not a LuminaAI-only spelling


def test_a_spelling_a_command_accepts_is_not_mapped(capsys: pytest.CaptureFixture[str]) -> None:
    # analyze-memory takes LuminaAI's --sequence-length itself; train does not
    assert main(["analyze-memory", "--preset", "debug", "--sequence-length", "128", "--gpus", "1"]) == 0
    assert main(["train", "--sequence-length", "128"]) == 1
    assert "--seq-len N" in capsys.readouterr().err


def test_mapped_flags_are_the_well_known_ones() -> None:
    assert LUMINAAI_FLAGS["--enable-flash-attention"].startswith("--attention-backend flash")
    assert "--config-file" not in LUMINAAI_FLAGS  # lumina-ds has it under the same name
    for flag in ("--use-wandb", "--steps", "--use-tensorboard"):
        assert flag in LUMINAAI_FLAGS
    assert "--compile" not in LUMINAAI_FLAGS  # lumina-ds has it under the same name


def test_unknown_preset_is_e001_with_the_list(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["train"], ["plan", "--nodes", "1"], ["estimate-parameters"], ["check-environment"]):
        assert main([*command, "--preset", "b999"]) == 1
        err = capsys.readouterr().err
        assert "[E001] unknown preset 'b999'" in err and ", ".join(PRESETS) in err


def test_luminaai_config_file_spelling(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", "my.yaml", "--train-data", "x.jsonl"]) == 1
    err = capsys.readouterr().err
    assert "[E002]" in err and "--config-file my.yaml" in err


def test_log_line_perplexity_is_that_of_the_lm_loss_printed_beside_it() -> None:
    record = {"epoch": 0, "step": 5, "total_steps": 10, "elapsed_s": 60.0, "eta_s": 60.0, "loss": 1.5e15,
              "lm_loss": 7.625, "ppl": 2049.33, "lr": 1e-3, "beta2": 0.95, "grad_norm": 1.0, "tokens_per_s": 10.0,
              "memory": "x"}  # fmt: skip
    line = format_log_line(record).splitlines()[1]
    assert line.startswith("Loss: 1.5e+15 | LM Loss: 7.625 | PPL: 2049.33 |")
