from __future__ import annotations

import pytest

from lumina_ds.batch import IGNORE_INDEX
from lumina_ds.errors import ConfigError, DataError
from lumina_ds.tokenizer import ASSISTANT, END, ChatTemplate, ChatTokenizer, Message, normalize_role
from tests.helpers import format_text, parse_conversation

THREE_TURNS = [
    Message("system", "You are a concise assistant."),
    Message("user", "What does RoPE do?"),
    Message("assistant", "RoPE rotates query and key vectors by position-dependent angles."),
    Message("user", "Thanks! And MoE?"),
    Message("assistant", "A router sends each token to the top-k experts."),
    Message("user", "Say it in one word ✨"),
    Message("assistant", "Routing. Café, 日本語 😊"),
]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("user", "user"),
        (" Human ", "user"),
        ("PROMPTER", "user"),
        ("assistant", "assistant"),
        ("AI", "assistant"),
        ("bot", "assistant"),
        ("gpt", "assistant"),
        ("Model", "assistant"),
        ("System", "system"),
        ("wizard", None),
        ("", None),
    ],
)
def test_normalize_role(raw: str, expected: str | None) -> None:
    assert normalize_role(raw) == expected


def test_parse_conversation_normalizes_roles() -> None:
    obj = {"messages": [{"role": "human", "content": "hi"}, {"role": "bot", "content": "hello"}]}
    assert parse_conversation(obj) == [Message("user", "hi"), Message("assistant", "hello")]


@pytest.mark.parametrize(
    ("obj", "code", "fragment"),
    [
        ("text", "E101", "not an object"),
        ({"messages": {"role": "user"}}, "E101", "not a list"),
        ({}, "E102", "no 'messages'"),
        ({"messages": []}, "E102", "empty"),
        ({"messages": [{"role": "user"}]}, "E102", "no 'content'"),
        ({"messages": [{"role": 1, "content": "x"}]}, "E101", "role is a int"),
        ({"messages": [{"role": "user", "content": "x"}]}, "E101", "no assistant turn"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "ai", "content": ""}]}, "E102", "assistant"),
        ({"messages": [{"role": "user", "content": "x\x00"}, {"role": "ai", "content": "y"}]}, "E103", "U+0000"),
    ],
)
def test_parse_conversation_errors(obj: object, code: str, fragment: str) -> None:
    with pytest.raises(DataError) as info:
        parse_conversation(obj)
    assert info.value.code == code
    assert fragment in info.value.message


def _expected_targets(messages: list[Message], tok: ChatTokenizer) -> list[int]:
    """Positions of assistant content + END, computed from the lengths of separately encoded pieces."""
    newline = len(tok.encode("\n"))
    positions: list[int] = []
    cursor = 1  # BOS
    for message in messages:
        cursor += 1 + newline
        content = len(tok.encode(message.content))
        if message.role == "assistant":
            positions.extend(range(cursor, cursor + content + 1))
        cursor += content + 1 + newline
    return positions


def test_assistant_only_targets_are_exact(tokenizer: ChatTokenizer) -> None:
    ids, labels = ChatTemplate().encode_conversation(THREE_TURNS, tokenizer)
    assert len(ids) == len(labels)
    assert labels[-1] == IGNORE_INDEX
    target_positions = [t + 1 for t, label in enumerate(labels) if label != IGNORE_INDEX]
    assert target_positions == _expected_targets(THREE_TURNS, tokenizer)
    assert all(labels[p - 1] == ids[p] for p in target_positions)
    targets = tokenizer.decode([ids[p] for p in target_positions], skip_special=False)
    assert targets == "".join(m.content + END for m in THREE_TURNS if m.role == "assistant")
    assert sum(ids[p] == tokenizer.end_id for p in target_positions) == 3


def test_encoded_text_matches_template_text(tokenizer: ChatTokenizer) -> None:
    template = ChatTemplate()
    ids, _ = template.encode_conversation(THREE_TURNS, tokenizer)
    assert ids[0] == tokenizer.bos_id
    assert tokenizer.decode(ids, skip_special=False) == format_text(THREE_TURNS)


def test_train_on_all_targets_every_token_after_bos(tokenizer: ChatTokenizer) -> None:
    ids, labels = ChatTemplate().encode_conversation(THREE_TURNS, tokenizer, train_on="all")
    assert labels[:-1] == ids[1:]
    assert labels[-1] == IGNORE_INDEX


def test_unknown_train_on_is_rejected(tokenizer: ChatTokenizer) -> None:
    with pytest.raises(ConfigError):
        ChatTemplate().encode_conversation(THREE_TURNS, tokenizer, train_on="user")


def test_prompt_is_prefix_of_training_encoding(tokenizer: ChatTokenizer) -> None:
    template = ChatTemplate()
    prompt = template.encode_prompt(THREE_TURNS[:-1], tokenizer)
    full, _ = template.encode_conversation(THREE_TURNS, tokenizer)
    assert prompt == full[: len(prompt)]
    assert tokenizer.decode(prompt, skip_special=False).endswith(f"{ASSISTANT}\n")
    # What the model must generate next is exactly the assistant content followed by END.
    assert full[len(prompt) :] == [
        *tokenizer.encode(THREE_TURNS[-1].content),
        tokenizer.end_id,
        *tokenizer.encode("\n"),
    ]


def test_special_token_text_in_content_stays_text(tokenizer: ChatTokenizer) -> None:
    ids = tokenizer.encode(f"fake {END} and {ASSISTANT}")
    assert tokenizer.end_id not in ids
    assert tokenizer.token_id(ASSISTANT) not in ids
    assert tokenizer.decode(ids) == f"fake {END} and {ASSISTANT}"
