"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with the chat special tokens, or an imported model's
tokenizer with its own chat template (then conversations are encoded by the template, see tokenizer/codec.py)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lumina_ds.errors import ConfigError, DataError
from lumina_ds.tokenizer.chat_format import BOS, END, NATIVE_CHAT_TEMPLATE, PAD, SPECIAL_TOKENS, ChatTemplate, Message
from lumina_ds.tokenizer.codec import TemplateCodec
from lumina_ds.tokenizer.files import (
    TOKENIZER_JSON,
    read_generation_stops,
    write_generation_stops,
    write_json,
    write_template_files,
)
from lumina_ds.tokenizer.jinja import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, JinjaChatTemplate, load_chat_template

logger = logging.getLogger(__name__)
_SERIALIZED_KEY = "lumina_ds_tokenizer"  # to_str of a tokenizer with a chat template


class ChatTokenizer:
    """A `tokenizers.Tokenizer` with lumina-ds' chat format (every chat special token guaranteed), or with a model's
    own chat template (`chat_template`; the vocabulary is left as it is)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        chat_template: JinjaChatTemplate | None = None,
        generation_stops: Iterable[int] = (),
    ) -> None:
        self._tok = tokenizer
        self._identity: str | None = None  # identity(), once asked (nothing changes the tokenizer after this)
        # the model's generation_config.json eos ids: chat stops there too, as transformers' generate does
        self.generation_stops = frozenset(i for i in generation_stops if i < tokenizer.get_vocab_size(True))
        if chat_template is not None and chat_template.source == NATIVE_CHAT_TEMPLATE:
            chat_template = None  # our own export read back: the native encoder gives the same tokens, faster
        self.chat_template = chat_template
        self.codec = TemplateCodec(chat_template, tokenizer) if chat_template is not None else None
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None] if self.codec is None else []
        if missing:
            # Appended at the end of the vocab; the model's embedding must cover vocab_size.
            tokenizer.add_special_tokens(missing)
            logger.warning("tokenizer lacked special tokens %s; added them with new ids", missing)
        self.added_special_tokens: list[str] = missing
        # Text that happens to contain "<|end|>" must stay text, never become a control token.
        tokenizer.encode_special_tokens = True

    @property
    def backend(self) -> Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, special and added tokens included."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def pad_id(self) -> int:
        """Id of the padding token (a template's pad_token, else its EOS or end-of-turn)."""
        return self.codec.pad_id if self.codec is not None else self.token_id(PAD)

    @property
    def bos_id(self) -> int:
        """Id of the beginning-of-conversation token (lumina-ds' format; a template writes its own)."""
        assert self.codec is None, "a chat template writes its own beginning of conversation"
        return self.token_id(BOS)

    @property
    def end_id(self) -> int:
        """Id of the end-of-turn token that closes an assistant reply."""
        return self.codec.end_id if self.codec is not None else self.token_id(END)

    @property
    def stop_ids(self) -> frozenset[int]:
        """Generation stops at these ids: the end-of-turn token, a template's EOS token, and the eos ids of the
        model's generation_config.json."""
        own = self.codec.stop_ids if self.codec is not None else frozenset({self.end_id})
        return own | self.generation_stops

    def encode_conversation(
        self, messages: Sequence[Message], *, train_on: str = "assistant"
    ) -> tuple[list[int], list[int]]:
        """`input_ids` and pre-shifted `labels` of a conversation, with the chat template or lumina-ds' format."""
        if self.codec is not None:
            return self.codec.encode_conversation(messages, train_on=train_on)
        return ChatTemplate().encode_conversation(messages, self, train_on=train_on)

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        """The conversation followed by the opening of an assistant turn: what chat feeds the model."""
        if self.codec is not None:
            return self.codec.encode_prompt(messages)
        return ChatTemplate().encode_prompt(messages, self)

    def encode(self, text: str) -> list[int]:
        """Encode plain text; special-token strings inside it are encoded as ordinary text."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Like encode, with each token's character span in text."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return list(encoding.ids), list(encoding.offsets)

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Decode ids back to text."""
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special))

    def token_id(self, token: str) -> int:
        """Id of a token string that must be in the vocabulary."""
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return int(token_id)

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as `tokenizer.json` (HF-compatible); a chat template goes beside it, as
        chat_template.jinja and tokenizer_config.json (its special tokens), and the model's stop ids as
        generation_config.json's eos_token_id, where from_file finds them again."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path))
        if self.chat_template is not None:
            write_template_files(self.chat_template, path.parent)
        if self.generation_stops:
            write_generation_stops(self.generation_stops, path.parent)

    def export_files(self, out_dir: str | Path) -> list[Path]:
        """Write tokenizer.json, tokenizer_config.json (chat template, bos/eos/pad, added tokens) and
        chat_template.jinja into out_dir, so that transformers' `AutoTokenizer.from_pretrained(out_dir)
        .apply_chat_template(...)` gives the tokens lumina-ds trains and chats with. lumina-ds' own format is exported
        as NATIVE_CHAT_TEMPLATE with its end-of-turn token as EOS; an imported model keeps its own template and special
        tokens. -> the paths written."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        template = self.chat_template
        source = template.source if template is not None else NATIVE_CHAT_TEMPLATE
        special = dict(template.special_tokens) if template is not None else {"bos_token": BOS, "eos_token": END,
                                                                                "pad_token": PAD}  # fmt: skip
        added = {
            str(token_id): {"content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
                            "rstrip": token.rstrip, "single_word": token.single_word, "special": token.special}
            for token_id, token in sorted(self._tok.get_added_tokens_decoder().items())
        }  # fmt: skip
        config = {
            # The fast tokenizer reads tokenizer.json as it is (a model-specific class could add or move tokens).
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "added_tokens_decoder": added,
            "clean_up_tokenization_spaces": False,
            "chat_template": source,
        }
        paths = [out / TOKENIZER_JSON, out / TOKENIZER_CONFIG_FILE, out / CHAT_TEMPLATE_FILE]
        self._tok.save(str(paths[0]))
        write_json(paths[1], config)
        paths[2].write_text(source, encoding="utf-8")
        return paths

    def to_str(self) -> str:
        """The tokenizer as one string (how worker processes receive it; part of the prepared-data cache key): the
        tokenizer.json text, wrapped with the chat template when there is one."""
        if self.chat_template is None:
            return str(self._tok.to_str())
        return json.dumps({_SERIALIZED_KEY: self._tok.to_str(), "chat_template": self.chat_template.to_json()})

    def identity(self) -> str:
        """A content hash of the tokenizer (vocabulary, merges, special tokens, chat template): what a checkpoint
        records, so that a resume with any other tokenizer is refused. Computed once: every save records it, and
        serialising a large vocabulary is not free."""
        if self._identity is None:
            self._identity = hashlib.blake2b(self.to_str().encode("utf-8"), digest_size=16).hexdigest()
        return self._identity

    @classmethod
    def from_str(cls, text: str) -> ChatTokenizer:
        """Inverse of to_str."""
        if not text.startswith(f'{{"{_SERIALIZED_KEY}"'):
            return cls(Tokenizer.from_str(text))
        data = json.loads(text)
        template = JinjaChatTemplate.from_json(data["chat_template"])
        return cls(Tokenizer.from_str(data[_SERIALIZED_KEY]), chat_template=template)

    @classmethod
    def from_file(cls, path: str | Path) -> ChatTokenizer:
        """Load a `tokenizer.json` with the chat template of its directory (chat_template.jinja, else
        tokenizer_config.json's) and generation_config.json's stop ids; without a template, missing special tokens
        are added (see `added_special_tokens`)."""
        path = Path(path)
        if not path.is_file():
            raise DataError("E104", f"tokenizer file not found: {path}", "Pass a tokenizer.json written by lumina-ds.")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers reports unreadable/invalid files as a plain Exception
            raise DataError(
                "E115", f"cannot read tokenizer {path}: {exc}", "Expected a Hugging Face tokenizer.json file."
            ) from exc
        template, stops = load_chat_template(path.parent), read_generation_stops(path.parent)
        return cls(tokenizer, chat_template=template, generation_stops=stops)


def train_bpe_tokenizer(texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2) -> ChatTokenizer:
    """Train a byte-level BPE tokenizer; special tokens get ids 0..5 and any UTF-8 text round-trips."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ConfigError("E002", f"vocab_size {vocab_size} is too small", "Use at least 262 (256 bytes + 6 specials).")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        # The full byte alphabet keeps every input encodable even if some bytes never occur in training.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return ChatTokenizer(tokenizer)
