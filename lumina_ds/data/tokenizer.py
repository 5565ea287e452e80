"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with the chat special tokens."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lumina_ds.data.chat_format import BOS, END, PAD, SPECIAL_TOKENS, Message
from lumina_ds.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


class ChatTokenizer:
    """A `tokenizers.Tokenizer` that is guaranteed to hold every chat special token."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
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
        """Id of the padding token."""
        return self.token_id(PAD)

    @property
    def bos_id(self) -> int:
        """Id of the beginning-of-conversation token."""
        return self.token_id(BOS)

    @property
    def end_id(self) -> int:
        """Id of the end-of-turn token (generation stops here)."""
        return self.token_id(END)

    def encode(self, text: str) -> list[int]:
        """Encode plain text; special-token strings inside it are encoded as ordinary text."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

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
        """Write the tokenizer as a single `tokenizer.json` file (HF-compatible)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path))

    @classmethod
    def from_file(cls, path: str | Path) -> ChatTokenizer:
        """Load a `tokenizer.json`; missing special tokens are added (see `added_special_tokens`)."""
        path = Path(path)
        if not path.is_file():
            raise DataError("E104", f"tokenizer file not found: {path}", "Pass a tokenizer.json written by lumina-ds.")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers reports unreadable/invalid files as a plain Exception
            raise DataError(
                "E101", f"cannot read tokenizer {path}: {exc}", "Expected a Hugging Face tokenizer.json file."
            ) from exc
        return cls(tokenizer)


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


def conversation_texts(conversations: Iterable[Sequence[Message]]) -> Iterator[str]:
    """Yield every message content, for tokenizer training."""
    for messages in conversations:
        for message in messages:
            yield message.content


def sample_texts(paths: Iterable[str | Path], *, max_bytes: int) -> Iterator[str]:
    """Message contents of JSONL chat files, streamed in file order, until about `max_bytes` of text (bad lines are
    skipped): a BPE vocabulary needs a sample, not a multi-GB corpus in memory."""
    from lumina_ds.data.reader import SkippedLine, iter_conversations

    budget = max_bytes
    for path in paths:
        for _, item in iter_conversations(path):
            if isinstance(item, SkippedLine):
                continue
            for text in conversation_texts([item]):
                budget -= len(text.encode())
                yield text
            if budget <= 0:
                return
