from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from lumina_ds.errors import ConfigError, DataError
from lumina_ds.tokenizer import SPECIAL_TOKENS, ChatTokenizer, Message, train_bpe_tokenizer
from tests.helpers import conversation_texts, read_conversations

SAMPLES = [
    "RoPE rotates query and key vectors.",
    "crème brûlée, naïve café, Ångström, Straße",
    "日本語のテキストと中文文本",
    "emoji 😊🚀👩‍💻 and symbols ∑∫√ ≤ ≥",
    "  leading spaces\n\ttabs and\r\nnewlines  ",
    "",
]


def test_special_tokens_come_first(tokenizer: ChatTokenizer) -> None:
    assert [tokenizer.token_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.end_id) == (0, 1, 5)
    assert tokenizer.vocab_size == 512
    assert tokenizer.added_special_tokens == []


def test_bpe_learned_merges(tokenizer: ChatTokenizer) -> None:
    text = "attention and experts"
    assert len(tokenizer.encode(text)) < len(text.encode("utf-8"))


@pytest.mark.parametrize("text", SAMPLES)
def test_utf8_round_trip(tokenizer: ChatTokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_decode_skips_special_tokens_by_default(tokenizer: ChatTokenizer) -> None:
    ids = [tokenizer.bos_id, *tokenizer.encode("hi"), tokenizer.end_id]
    assert tokenizer.decode(ids) == "hi"
    assert tokenizer.decode(ids, skip_special=False) == "<|bos|>hi<|end|>"


def test_save_and_load_identical(tokenizer: ChatTokenizer, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "tokenizer.json"
    tokenizer.save(path)
    loaded = ChatTokenizer.from_file(path)
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.backend.get_vocab() == tokenizer.backend.get_vocab()
    for text in SAMPLES:
        assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.encode("<|end|>") == tokenizer.encode("<|end|>")
    assert loaded.end_id not in loaded.encode("<|end|>")


def test_training_is_deterministic(examples_dir: Path) -> None:
    conversations = read_conversations(examples_dir / "conversations_eval.jsonl").conversations
    first = train_bpe_tokenizer(conversation_texts(conversations), vocab_size=400)
    second = train_bpe_tokenizer(conversation_texts(conversations), vocab_size=400)
    assert first.backend.to_str() == second.backend.to_str()


def test_conversation_texts_yields_every_content() -> None:
    convs = [[Message("user", "a"), Message("assistant", "b")], [Message("system", "c"), Message("assistant", "d")]]
    assert list(conversation_texts(convs)) == ["a", "b", "c", "d"]


def test_vocab_size_too_small_is_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        train_bpe_tokenizer(["hello"], vocab_size=100)
    assert info.value.code == "E002"


def test_missing_special_tokens_are_added(tmp_path: Path) -> None:
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(["hello world"] * 10, trainer=trainers.BpeTrainer(vocab_size=270, show_progress=False))
    base_size = raw.get_vocab_size()
    path = tmp_path / "plain.json"
    raw.save(str(path))
    loaded = ChatTokenizer.from_file(path)
    assert loaded.added_special_tokens == SPECIAL_TOKENS
    assert [loaded.token_id(t) for t in SPECIAL_TOKENS] == list(range(base_size, base_size + 6))
    assert loaded.vocab_size == base_size + 6


def test_unreadable_tokenizer_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError) as info:
        ChatTokenizer.from_file(bad)
    assert info.value.code == "E115"
    with pytest.raises(DataError) as info:
        ChatTokenizer.from_file(tmp_path / "missing.json")
    assert info.value.code == "E104"
