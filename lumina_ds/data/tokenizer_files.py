"""Tokenizer files as Hugging Face reads them: tokenizer.json, tokenizer_config.json and chat_template.jinja."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lumina_ds.data.chat_format import BOS, END, NATIVE_CHAT_TEMPLATE, PAD
from lumina_ds.data.chat_template import (
    CHAT_TEMPLATE_FILE,
    TOKENIZER_CONFIG_FILE,
    JinjaChatTemplate,
    read_tokenizer_config,
)

if TYPE_CHECKING:
    from lumina_ds.data.tokenizer import ChatTokenizer

TOKENIZER_JSON = "tokenizer.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# what ChatTokenizer.save writes beside tokenizer.json for a model's template (copies of a run dir need them)
TEMPLATE_FILES = (CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, GENERATION_CONFIG_FILE)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_template_files(template: JinjaChatTemplate, directory: Path) -> None:
    """chat_template.jinja, and the template's special tokens merged into the directory's tokenizer_config.json."""
    config = {**read_tokenizer_config(directory), **template.special_tokens}
    config.pop("chat_template", None)  # chat_template.jinja is the one copy (transformers prefers it anyway)
    (directory / CHAT_TEMPLATE_FILE).write_text(template.source, encoding="utf-8")
    _write_json(directory / TOKENIZER_CONFIG_FILE, config)


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
    _write_json(path, {**(config if isinstance(config, dict) else {}), "eos_token_id": sorted(stops)})


def export_tokenizer_files(tokenizer: ChatTokenizer, out_dir: str | Path) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json (chat template, bos/eos/pad, added tokens) and chat_template.jinja
    into out_dir, so that transformers' `AutoTokenizer.from_pretrained(out_dir).apply_chat_template(...)` gives the
    tokens lumina-ds trains and chats with. lumina-ds' own format is exported as NATIVE_CHAT_TEMPLATE with its
    end-of-turn token as EOS; an imported model keeps its own template and special tokens. -> the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    template = tokenizer.chat_template
    source = template.source if template is not None else NATIVE_CHAT_TEMPLATE
    special = (
        dict(template.special_tokens)
        if template is not None
        else {"bos_token": BOS, "eos_token": END, "pad_token": PAD}
    )
    added = {
        str(token_id): {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
        for token_id, token in sorted(tokenizer.backend.get_added_tokens_decoder().items())
    }
    config = {
        # The fast tokenizer reads tokenizer.json as it is (a model-specific class could add or move tokens).
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "chat_template": source,
    }
    paths = [out / TOKENIZER_JSON, out / TOKENIZER_CONFIG_FILE, out / CHAT_TEMPLATE_FILE]
    tokenizer.backend.save(str(paths[0]))
    _write_json(paths[1], config)
    paths[2].write_text(source, encoding="utf-8")
    return paths
