"""Files beside tokenizer.json as Hugging Face reads them: tokenizer_config.json, chat_template.jinja and
generation_config.json's stop ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lumina_ds.tokenizer.jinja import (
    CHAT_TEMPLATE_FILE,
    TOKENIZER_CONFIG_FILE,
    JinjaChatTemplate,
    read_tokenizer_config,
)

TOKENIZER_JSON = "tokenizer.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# what ChatTokenizer.save writes beside tokenizer.json for a model's template (copies of a run dir need them)
TEMPLATE_FILES = (CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, GENERATION_CONFIG_FILE)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_template_files(template: JinjaChatTemplate, directory: Path) -> None:
    """chat_template.jinja, and the template's special tokens merged into the directory's tokenizer_config.json."""
    config = {**read_tokenizer_config(directory), **template.special_tokens}
    config.pop("chat_template", None)  # chat_template.jinja is the one copy (transformers prefers it anyway)
    (directory / CHAT_TEMPLATE_FILE).write_text(template.source, encoding="utf-8")
    write_json(directory / TOKENIZER_CONFIG_FILE, config)


def read_generation_stops(directory: Path) -> frozenset[int]:
    """The `eos_token_id` (an id or a list) of the directory's generation_config.json: where transformers' generate
    stops for this model (Llama-3 lists <|eot_id|> and <|end_of_text|>, Qwen2.5 <|im_end|> and <|endoftext|>)."""
    path = directory / GENERATION_CONFIG_FILE
    if not path.is_file():
        return frozenset()
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return frozenset()  # not ours to validate: transformers reads it, chat only borrows the stop ids
    ids = value if isinstance(value, list) else [value]
    return frozenset(int(i) for i in ids if isinstance(i, int) and not isinstance(i, bool) and i >= 0)


def write_generation_stops(stops: frozenset[int], directory: Path) -> None:
    """Record stop ids as generation_config.json's `eos_token_id`, keeping the file's other keys."""
    path = directory / GENERATION_CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        config = {}
    write_json(path, {**(config if isinstance(config, dict) else {}), "eos_token_id": sorted(stops)})
