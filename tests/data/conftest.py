"""Shared fixtures: the bundled example files and a tokenizer trained on them once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from lumina_ds.tokenizer import ChatTokenizer, train_bpe_tokenizer
from tests.helpers import conversation_texts, read_conversations

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    return EXAMPLES


@pytest.fixture(scope="session")
def tokenizer() -> ChatTokenizer:
    conversations = read_conversations(EXAMPLES / "conversations.jsonl").conversations
    return train_bpe_tokenizer(conversation_texts(conversations), vocab_size=512)
