"""Chat format: roles, special tokens, the encoded-document type and the one template shared by training and chat."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from lumina_ds.batch import IGNORE_INDEX
from lumina_ds.errors import ConfigError

PAD = "<|pad|>"
BOS = "<|bos|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
# Order matters: a freshly trained tokenizer assigns ids in this order, so PAD is id 0.
SPECIAL_TOKENS: list[str] = [PAD, BOS, SYSTEM, USER, ASSISTANT, END]

TRAIN_ON_CHOICES = ("assistant", "all")

# a conversation encoded for training: ids int32 [T] and target flags uint8 [T] (target[t] = 1 when position t
# predicts ids[t + 1])
EncodedDoc = tuple[np.ndarray, np.ndarray]

_ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "ai": "assistant",
    "bot": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "system": "system",
}
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# The same format as a Hugging Face chat template (exported with the tokenizer): transformers' apply_chat_template
# gives token for token what ChatTemplate encodes. The assistant's content and END are its generation span.
NATIVE_CHAT_TEMPLATE = (
    "{{- '" + BOS + "' }}\n"
    "{%- for message in messages %}\n"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}\n"
    "{{- raise_exception('lumina-ds chats have system, user and assistant turns, not ' + message['role']) }}\n"
    "{%- endif %}\n"
    "{{- '<|' + message['role'] + '|>\\n' }}\n"
    "{%- if message['role'] == 'assistant' %}\n"
    "{%- generation %}{{- message['content'] + '" + END + "' }}{%- endgeneration %}\n"
    "{%- else %}\n"
    "{{- message['content'] + '" + END + "' }}\n"
    "{%- endif %}\n"
    "{{- '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '" + ASSISTANT + "\\n' }}{%- endif %}\n"
)
assert all(token == f"<|{role}|>" for role, token in ROLE_TOKENS.items()), "NATIVE_CHAT_TEMPLATE spells roles so"


def normalize_role(role: str) -> str | None:
    """Map a role alias (case-insensitive) to "user", "assistant" or "system"; None if unknown."""
    return _ROLE_ALIASES.get(role.strip().lower())


def known_roles() -> list[str]:
    """Every accepted role spelling (lower case), sorted."""
    return sorted(_ROLE_ALIASES)


@dataclass(frozen=True)
class Message:
    """One turn of a conversation with a canonical role."""

    role: str
    content: str


class TokenizerLike(Protocol):
    """What the template needs from a tokenizer (ChatTokenizer satisfies it)."""

    def encode(self, text: str) -> list[int]: ...

    def token_id(self, token: str) -> int: ...

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...


def newline_tokens(offsets: Sequence[tuple[int, int]]) -> int:
    """How many leading tokens of an encoded "\\n" + content cover only the newline (0 when BPE merged it into the
    content's first token: then that token is the content's, as in transformers' tokenization of the whole text)."""
    count = 0
    while count < len(offsets) and offsets[count][1] <= 1:
        count += 1
    return count


class ChatTemplate:
    """`<|bos|>` then `{ROLE}\\n{content}<|end|>\\n` per message; identical for training and generation."""

    def encode_conversation(
        self, messages: Sequence[Message], tokenizer: TokenizerLike, *, train_on: str = "assistant"
    ) -> tuple[list[int], list[int]]:
        """Return `input_ids` and pre-shifted `labels` (labels[t] is the target for position t, or IGNORE_INDEX)."""
        if train_on not in TRAIN_ON_CHOICES:
            raise ConfigError("E002", f"train_on must be one of {TRAIN_ON_CHOICES}, got {train_on!r}")
        train_all = train_on == "all"
        newline = tokenizer.encode("\n")
        end_id = tokenizer.token_id(END)
        ids = [tokenizer.token_id(BOS)]
        trainable = [False]
        for message in messages:
            # The text between two special tokens is tokenized as one piece, as transformers tokenizes the rendered
            # text; the trainable span is content + END (a token that merges the header's newline into the content
            # belongs to the content).
            body, offsets = tokenizer.encode_offsets("\n" + message.content)
            head = newline_tokens(offsets)
            header = [tokenizer.token_id(ROLE_TOKENS[message.role]), *body[:head]]
            learn = train_all or message.role == "assistant"
            content = body[head:]
            for piece, flag in ((header, train_all), (content, learn), ([end_id], learn), (newline, train_all)):
                ids.extend(piece)
                trainable.extend([flag] * len(piece))
        labels = [ids[t + 1] if trainable[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)]
        labels.append(IGNORE_INDEX)
        return ids, labels

    def encode_prompt(self, messages: Sequence[Message], tokenizer: TokenizerLike) -> list[int]:
        """Encode the conversation plus an open assistant header; the model then generates until END."""
        ids, _ = self.encode_conversation(messages, tokenizer, train_on="all")
        return [*ids, tokenizer.token_id(ASSISTANT), *tokenizer.encode("\n")]
