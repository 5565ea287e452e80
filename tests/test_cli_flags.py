"""Every training flag lands in a real RunConfig field (no flag is parsed and ignored)."""

from __future__ import annotations

import argparse
import dataclasses

from lumina_ds.cli.train import run_config_from_args
from lumina_ds.cli.train_flags import FLAG_FIELDS, add_train_arguments
from lumina_ds.config.run import RunConfig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    return p


def test_every_flag_maps_to_an_existing_field() -> None:
    run = RunConfig()
    dests = {a.dest for a in parser()._actions} - {"help", "preset", "config_file", "local_rank"}
    assert dests == set(FLAG_FIELDS)
    for section, field in FLAG_FIELDS.values():
        target = run
        for part in section.split("."):
            target = getattr(target, part)
        alias = getattr(type(target), field, None)  # an older spelling kept as a settable property
        settable = isinstance(alias, property) and alias.fset is not None
        assert field in {f.name for f in dataclasses.fields(target)} or settable, (section, field)


def test_flags_override_the_preset() -> None:
    args = parser().parse_args(
        ["--preset", "b1", "--batch-size", "3", "--lr", "1e-4", "--no-gradient-checkpointing", "--zero-stage", "3",
         "--top-k", "1", "--auto-resume", "--experiment-name", "x"]
    )  # fmt: skip
    run = run_config_from_args(args)
    assert run.preset == "b1"
    assert run.train.micro_batch_size == 3 and run.train.learning_rate == 1e-4
    assert run.train.gradient_checkpointing is False  # b1 turns it on; the flag turns it off
    assert run.distributed.zero_stage == 3 and run.model.moe.top_k == 1
    assert run.checkpoint.auto_resume and run.logging.experiment_name == "x"


def test_unset_flags_keep_preset_values() -> None:
    run = run_config_from_args(parser().parse_args(["--preset", "b1"]))
    assert run.train.gradient_checkpointing is True and run.train.learning_rate == 3e-4
