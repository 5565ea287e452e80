"""What only tests need from the package's pieces: whole-file reads, one conversation encoded, the chat format as text,
and a plain model's weights written as a checkpoint writes them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from lumina_ds.data.prepare.documents import DocEncoder
from lumina_ds.data.records.checks import DEFAULT_LIMIT, LineLimit, check_object
from lumina_ds.data.records.reader import Location, iter_records
from lumina_ds.data.records.types import SkippedLine
from lumina_ds.run_dir import WEIGHTS_FILE, write_weights
from lumina_ds.tokenizer import BOS, END, ROLE_TOKENS, EncodedDoc, Message


@dataclass
class ReadResult:
    """Valid conversations of a source plus the skipped records and the number of the last record."""

    conversations: list[list[Message]] = field(default_factory=list)
    skipped: list[SkippedLine] = field(default_factory=list)
    total_lines: int = 0


def read_conversations(location: Location, *, strict: bool = False, limit: LineLimit = DEFAULT_LIMIT) -> ReadResult:
    """A whole source read into memory, collecting skipped records (strict: the first one raises)."""
    result = ReadResult()
    for line_no, item in iter_records(location, strict=strict, limit=limit):
        result.total_lines = line_no
        if isinstance(item, SkippedLine):
            result.skipped.append(item)
        elif item is not None:
            result.conversations.append(item)
    return result


def parse_conversation(obj: object) -> list[Message]:
    """The messages training uses of a decoded JSON line; the DataError of its first problem otherwise."""
    checked = check_object(obj)
    if checked.error is not None:
        raise checked.error.to_error()
    assert checked.messages is not None
    return checked.messages


def conversation_texts(conversations: Iterable[Sequence[Message]]) -> Iterator[str]:
    """Every message content, for training a tokenizer in a test."""
    for messages in conversations:
        for message in messages:
            yield message.content


def format_text(messages: Sequence[Message]) -> str:
    """lumina-ds' chat format written out as text."""
    return BOS + "".join(f"{ROLE_TOKENS[m.role]}\n{m.content}{END}\n" for m in messages)


def encode_messages(encoder: DocEncoder, messages: Sequence[Message]) -> EncodedDoc:
    """One conversation through the encoder's own path: as the JSONL line a source would hold."""
    line = json.dumps({"messages": [{"role": m.role, "content": m.content} for m in messages]}).encode()
    (doc,) = encoder.encode_lines([(1, line)])
    assert isinstance(doc, tuple), doc
    return doc


def save_consolidated(model: nn.Module, path: str | Path) -> Path:
    """A single-process model's weights as a checkpoint's model.safetensors (or to `path` if it ends in
    .safetensors); a tied lm_head.weight is left out, as consolidation leaves it out."""
    path = Path(path)
    target = path if path.suffix == ".safetensors" else path / WEIGHTS_FILE
    tied = getattr(model, "lm_head", None) is not None and model.lm_head.weight is model.embed.weight
    state = {name: tensor for name, tensor in model.state_dict().items() if not (tied and name == "lm_head.weight")}
    return write_weights(state, target)
