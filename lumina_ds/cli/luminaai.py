"""LuminaAI's spellings that lumina-ds does not use, each with the one line that says what to write instead."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

_SOON = "not in lumina-ds yet"
LUMINAAI_FLAGS: dict[str, str] = {
    # actions were flags of main.py; here they are subcommands
    "--validate-data": "lumina-ds validate-data FILE [--create-report] [--show-stats] [--fix-errors --output F]",
    "--estimate-parameters": "lumina-ds estimate-parameters --preset NAME (every component is always shown)",
    "--analyze-memory": "lumina-ds analyze-memory --preset NAME --batch-size N --sequence-length N",
    "--estimate-time": "lumina-ds estimate-time --preset NAME --train-data F --gpus N --hardware-profile a100-80gb",
    "--check-environment": "lumina-ds check-environment [--preset NAME]",
    "--dry-run": "lumina-ds dry-run --preset NAME --nodes N",
    "--detailed": "lumina-ds estimate-parameters always lists every component",
    "--dev-mode": "lumina-ds check-environment reports everything it checks; there is no separate mode",
    # training flags spelled differently
    "--use-tensorboard": "TensorBoard is on by default (--no-tensorboard turns it off)",
    "--use-wandb": "--wandb (with --wandb-project, --wandb-entity, --wandb-run-name; pip install lumina-ds[wandb])",
    "--tensorboard-dir": "TensorBoard writes to <output-dir>/<experiment-name>/tensorboard",
    "--enable-flash-attention": "--attention-backend flash (auto already picks flash-attn on a GPU when installed)",
    "--sequence-length": "--seq-len N",
    "--steps": "--max-steps N",
    "--init-std": "a YAML run config: `model: {init_std: 0.015}` with --config-file",
    "--use-stable-embedding": "no equivalent: embeddings are a plain nn.Embedding initialised with model.init_std",
    "--log-expert-usage": "tokens per expert are in every log record (metrics.jsonl `expert_counts`)",
    "--expert-usage-frequency": "--log-every-n-steps N (expert usage is logged with every record)",
    "--verbose": "set LUMINA_DS_VERBOSE=1 to see DeepSpeed's own INFO logging",
    "--debug": "set LUMINA_DS_VERBOSE=1 to see DeepSpeed's own INFO logging",
    "--pin-memory": "not offered: batches are assembled in the training process and copied once per step",
    "--persistent-workers": "always on: streaming loader workers live for the whole run",
    # generation checks and features still to come (--profile-training, --profile-memory, --test-generation are
    # train flags under their LuminaAI names)
    "--track-allocations": "--profile-memory (peak memory per phase; on a GPU a CUDA snapshot of the allocations)",
    "--test-prompts": "lumina-ds generate-check --checkpoint RUN --prompts FILE",
    "--compare-precisions": "lumina-ds generate-check --checkpoint RUN --compare-precisions",
    "--output-comparisons": "lumina-ds generate-check writes <run dir>/generations.jsonl",
    "--benchmark-generation": "python benchmarks/generation.py --batch-sizes 1 8 --sequence-lengths 128 512",
    "--batch-sizes": "python benchmarks/generation.py --batch-sizes 1 8",
    "--sequence-lengths": "python benchmarks/generation.py --sequence-lengths 128 512",
    "--track-best-model": "the best evaluation (loss and step) is tracked in every run; best-model checkpoints are "
    f"{_SOON}",
    "--best-metric": "the best evaluation loss is tracked; other metrics are not",
    "--modify-config": f"changing the optimizer settings of a resumed run is {_SOON}",
    "--analyze-checkpoints": f"checkpoint analysis is {_SOON}",
}
# LuminaAI spellings lumina-ds accepts as they are, with one line saying what they mean here
LUMINAAI_ALIASES: dict[str, str] = {
    f"--{what}-every-n-batches": f"--{what}-every-n-steps (it counts optimizer steps, not micro-batches)"
    for what in ("log", "eval", "save")
}
CONFIG_FILE_SUFFIXES = (".yaml", ".yml", ".json")


def _subparser(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser of the subcommand named first in argv (the top-level parser when there is none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for token in argv:
                if token in action.choices:
                    return _subparser(action.choices[token], argv[argv.index(token) + 1 :])
    return parser


def luminaai_mappings(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """One line per LuminaAI spelling in argv that the chosen subcommand does not accept."""
    known = set(_subparser(parser, argv)._option_string_actions)
    lines = []
    for token in argv:
        name = token.split("=", 1)[0]
        if name.startswith("--") and name not in known and name in LUMINAAI_FLAGS:
            lines.append(f"{name} (LuminaAI) -> {LUMINAAI_FLAGS[name]}")
    return lines


def alias_notes(argv: Sequence[str]) -> list[str]:
    """One line per accepted LuminaAI spelling in argv, naming the lumina-ds one."""
    used = {token.split("=", 1)[0] for token in argv}
    return [f"note: {name} (LuminaAI) = {LUMINAAI_ALIASES[name]}" for name in LUMINAAI_ALIASES if name in used]


def config_file_given_as_preset(preset: str | None) -> bool:
    """LuminaAI's `--config FILE.yaml`: --config names a preset here."""
    return preset is not None and preset.endswith(CONFIG_FILE_SUFFIXES)
