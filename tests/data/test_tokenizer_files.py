"""Parity with transformers: the tokenizer files lumina-ds writes give, through `apply_chat_template`, token for token
what lumina-ds trains and chats with; for our own format and for a model's imported template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lumina_ds.data.prepare.tokenize import EncodeSettings
from lumina_ds.errors import DataError
from lumina_ds.tokenizer.chat_format import NATIVE_CHAT_TEMPLATE, Message
from lumina_ds.tokenizer.chat_tokenizer import ChatTokenizer, train_bpe_tokenizer
from lumina_ds.tokenizer.jinja import JinjaChatTemplate, load_chat_template
from tests.data.hf_templates import LLAMA3, TEXTS, family_chat_tokenizer
from tests.helpers import encode_messages

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [
        Message("system", "Be brief."),
        Message("user", "Hello there, how are you today?"),
        Message("assistant", "I am fine.\n\nThanks for asking!"),
        Message("user", "  leading spaces and\ttabs"),
        Message("assistant", "\n\nnewlines first, then words"),
    ],
    [Message("user", "ünïcödé 日本語 🙂"), Message("assistant", " 🙂 and emoji\n")],
    [Message("user", "What is 2 + 2?"), Message("assistant", "  It is 4.  ")],
    [Message("system", "\nx"), Message("user", "日本"), Message("assistant", "語")],
]


def _dicts(messages: list[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _hf_encode(hf: object, messages: list[Message], **kwargs: object) -> dict[str, list[int]]:
    out = hf.apply_chat_template(_dicts(messages), tokenize=True, return_dict=True, **kwargs)  # type: ignore[attr-defined]
    return {key: list(value) for key, value in out.items()}


def _loss_mask(labels: list[int]) -> list[int]:
    """1 for each token that is a training target (labels[t] is the target of token t + 1)."""
    return [0] + [int(label != -100) for label in labels[:-1]]


@pytest.fixture(scope="module")
def native() -> ChatTokenizer:
    return train_bpe_tokenizer(TEXTS, vocab_size=420, min_frequency=1)


def test_native_format_equals_apply_chat_template(native: ChatTokenizer, tmp_path: Path) -> None:
    written = native.export_files(tmp_path)
    assert [p.name for p in written] == ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json"), chat_template=NATIVE_CHAT_TEMPLATE
    )
    assert auto.eos_token == "<|end|>"
    compared = 0
    for messages in CONVERSATIONS:
        ids, labels = native.encode_conversation(messages)
        for hf in (auto, fast):
            out = _hf_encode(hf, messages, return_assistant_tokens_mask=True)
            assert out["input_ids"] == ids
            assert out["assistant_masks"] == _loss_mask(labels)
            assert _hf_encode(hf, messages[:-1], add_generation_prompt=True)["input_ids"] == native.encode_prompt(
                messages[:-1]
            )
            compared += 1
        # the targets are the replies and their end-of-turn tokens, exactly (here, "\n\n\n" after the header is
        # one pre-token: its first newline is the header's, the others the reply's)
        targets = [label for label in labels if label != -100]
        replies = "".join(m.content + "<|end|>" for m in messages if m.role == "assistant")
        assert native.decode(targets, skip_special=False) == replies
    assert compared == 2 * len(CONVERSATIONS)


def test_a_token_shared_by_the_header_newline_and_the_reply_is_the_replys(tmp_path: Path) -> None:
    # "\n\n " before a word makes byte-level BPE learn a "\n\n" token; a reply "\n but..." then starts with it
    tokenizer = train_bpe_tokenizer([*TEXTS, *["a\n\n b"] * 20], vocab_size=420, min_frequency=1)
    messages = [Message("user", "Hi"), Message("assistant", "\n but words")]
    ids, labels = tokenizer.encode_conversation(messages)
    at = ids.index(tokenizer.token_id("<|assistant|>"))
    assert tokenizer.decode([ids[at + 1]], skip_special=False) == "\n\n"
    assert labels[at] == ids[at + 1]  # the header's newline rides in the reply's first token, which is a target
    tokenizer.export_files(tmp_path)
    out = _hf_encode(transformers.AutoTokenizer.from_pretrained(tmp_path), messages, return_assistant_tokens_mask=True)
    assert out["input_ids"] == ids and out["assistant_masks"] == _loss_mask(labels)


def test_special_token_strings_in_contents_stay_text_as_with_sanitize_control_tokens(
    native: ChatTokenizer, tmp_path: Path
) -> None:
    native.export_files(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = [Message("user", "say <|end|> and <|assistant|>"), Message("assistant", "ok <|end|><|bos|>")]
    ids, _ = native.encode_conversation(messages)
    assert ids.count(native.end_id) == 2  # the two turns' own; the strings in the contents are text
    assert _hf_encode(auto, messages, sanitize_control_tokens=True)["input_ids"] == ids
    assert _hf_encode(auto, messages)["input_ids"] != ids  # by default transformers makes them control tokens


def test_native_template_read_back_uses_the_native_encoder(native: ChatTokenizer, tmp_path: Path) -> None:
    native.export_files(tmp_path)
    again = ChatTokenizer.from_file(tmp_path / "tokenizer.json")
    assert again.codec is None and again.chat_template is None
    assert again.encode_conversation(CONVERSATIONS[0]) == native.encode_conversation(CONVERSATIONS[0])


@pytest.mark.parametrize(
    ("family", "tokenizer_class"),
    [
        ("chatml", None),
        ("chatml", "Qwen2Tokenizer"),  # transformers rebuilds the pipeline in the class's code, from the vocabulary
        ("llama3", None),
        ("mistral", None),
        ("mistral", "LlamaTokenizerFast"),
        ("chatml_generation", None),
        ("qwen3_style", "Qwen2Tokenizer"),
    ],
)
def test_imported_template_equals_apply_chat_template(family: str, tokenizer_class: str | None, tmp_path: Path) -> None:
    tokenizer = family_chat_tokenizer(family)
    tokenizer.export_files(tmp_path)
    if tokenizer_class is not None:  # as the model's own tokenizer_config.json names it
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": tokenizer_class}))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer_class is None or type(hf).__name__.startswith(tokenizer_class.removesuffix("Fast"))
    for messages in CONVERSATIONS[:3]:
        ids, labels = tokenizer.encode_conversation(messages)
        out = _hf_encode(hf, messages, return_assistant_tokens_mask=family == "chatml_generation")
        assert out["input_ids"] == ids
        if family == "chatml_generation":
            assert out["assistant_masks"] == _loss_mask(labels)  # transformers' spans from the same markers
        prompt = _hf_encode(hf, messages[:-1], add_generation_prompt=True)["input_ids"]
        assert tokenizer.encode_prompt(messages[:-1]) == prompt


def test_save_writes_the_template_where_from_file_finds_it(tmp_path: Path) -> None:
    tokenizer = family_chat_tokenizer("llama3")
    tokenizer.save(tmp_path / "run" / "tokenizer.json")
    assert (tmp_path / "run" / "chat_template.jinja").read_text() == LLAMA3
    config = json.loads((tmp_path / "run" / "tokenizer_config.json").read_text())
    assert config == {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    again = ChatTokenizer.from_file(tmp_path / "run" / "tokenizer.json")
    assert again.chat_template == tokenizer.chat_template
    assert again.stop_ids == tokenizer.stop_ids
    assert again.encode_conversation(CONVERSATIONS[0]) == tokenizer.encode_conversation(CONVERSATIONS[0])


def test_worker_processes_receive_the_template(tmp_path: Path) -> None:
    tokenizer = family_chat_tokenizer("chatml")
    again = ChatTokenizer.from_str(tokenizer.to_str())
    assert again.chat_template == tokenizer.chat_template
    settings = EncodeSettings.of(tokenizer)
    native = EncodeSettings.of(train_bpe_tokenizer(TEXTS, vocab_size=420))
    assert settings.tokenizer_json != native.tokenizer_json
    ids, target = encode_messages(settings.encoder(), CONVERSATIONS[1])
    expected_ids, labels = tokenizer.encode_conversation(CONVERSATIONS[1])
    assert ids.tolist() == expected_ids
    assert target.tolist() == [int(label != -100) for label in labels]


def test_the_template_is_read_as_transformers_picks_it(tmp_path: Path) -> None:
    config = {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": LLAMA3}]}
    config["eos_token"] = {"content": "<|eot_id|>", "special": True}  # type: ignore[assignment]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    template = load_chat_template(tmp_path)
    assert template == JinjaChatTemplate(LLAMA3, special_tokens={"eos_token": "<|eot_id|>"})
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}<|eot_id|>")
    preferred = load_chat_template(tmp_path)
    assert preferred is not None and preferred.source == "{{ messages[0].content }}<|eot_id|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "tool_use"}]}))
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(DataError, match="no 'default'") as err:
        load_chat_template(tmp_path)
    assert err.value.code == "E120"
    assert load_chat_template(tmp_path / "nowhere") is None


def test_generation_config_stop_ids_are_read_and_saved_with_the_tokenizer(tmp_path: Path) -> None:
    model = tmp_path / "model"
    family_chat_tokenizer("llama3").export_files(model)  # EOS <|eot_id|> (4), as Llama-3-Instruct's
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4], "temperature": 0.6}))
    tokenizer = ChatTokenizer.from_file(model / "tokenizer.json")
    assert tokenizer.stop_ids == {1, 4}  # <|end_of_text|> and <|eot_id|>
    tokenizer.save(tmp_path / "run" / "tokenizer.json")
    assert json.loads((tmp_path / "run" / "generation_config.json").read_text()) == {"eos_token_id": [1, 4]}
    assert ChatTokenizer.from_file(tmp_path / "run" / "tokenizer.json").stop_ids == {1, 4}
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, "bos_token_id": 0}))
    assert ChatTokenizer.from_file(model / "tokenizer.json").stop_ids == {1, 4}
    (model / "generation_config.json").write_text("not json")
    assert ChatTokenizer.from_file(model / "tokenizer.json").stop_ids == {4}
