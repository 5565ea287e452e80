"""Loss spans of conversations rendered by a model's own chat template: exactly the assistant's text and its
end-of-turn token(s), whether found by incremental prefix rendering or from {% generation %} markers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lumina_ds.data.prepare.documents import DocEncoder
from lumina_ds.data.records.types import SkippedLine
from lumina_ds.errors import DataError
from lumina_ds.tokenizer.chat_format import Message
from lumina_ds.tokenizer.chat_tokenizer import ChatTokenizer
from lumina_ds.tokenizer.codec import target_flags
from lumina_ds.tokenizer.jinja import JinjaChatTemplate, SandboxError
from tests.data.hf_templates import CHATML_GENERATION, CHATML_SPECIALS, family_chat_tokenizer, family_tokenizer

# Multi-turn with a system turn; the second reply starts with a space and ends with a newline.
CONVERSATION = [
    Message("system", "Be brief."),
    Message("user", "Hello there"),
    Message("assistant", "I am fine.\n\nThanks"),
    Message("user", "  leading spaces"),
    Message("assistant", " ok 🙂\n"),
]

# The rendered conversation, written out by hand, as (text, is the loss on it) pieces.
EXPECTED = {
    "chatml": [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("I am fine.\n\nThanks<|im_end|>", True),
        ("\n<|im_start|>user\n  leading spaces<|im_end|>\n<|im_start|>assistant\n", False),
        (" ok 🙂\n<|im_end|>", True),
        ("\n", False),
    ],
    "llama3": [  # Llama-3 trims contents
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("I am fine.\n\nThanks<|eot_id|>", True),
        ("<|start_header_id|>user<|end_header_id|>\n\nleading spaces<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("ok 🙂<|eot_id|>", True),
    ],
    "mistral": [  # the system message joins the first user turn; the template writes a space before each reply
        ("<s> [INST] Be brief.\n\nHello there [/INST] ", False),
        ("I am fine.\n\nThanks</s>", True),
        (" [INST]   leading spaces [/INST] ", False),
        (" ok 🙂\n</s>", True),
    ],
    "chatml_generation": [
        ("<|im_start|>system\nA chat of 5 messages.<|im_end|>\n<|im_start|>system\nBe brief.<|im_end|>\n"
         "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n", False),
        ("I am fine.\n\nThanks<|im_end|>", True),
        ("\n<|im_start|>user\n  leading spaces<|im_end|>\n<|im_start|>assistant\n", False),
        (" ok 🙂\n<|im_end|>", True),
        ("\n", False),
    ],
}  # fmt: skip


def _spans(pieces: list[tuple[str, bool]]) -> tuple[str, list[tuple[int, int]]]:
    text, spans = "", []
    for piece, trained in pieces:
        if trained:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    return text, spans


def _trained_runs(tokenizer: ChatTokenizer, messages: list[Message]) -> list[str]:
    """The rendered text under each run of consecutive loss tokens, from the token offsets."""
    ids, labels = tokenizer.encode_conversation(messages)
    assert tokenizer.codec is not None
    text = tokenizer.chat_template.render(messages) if tokenizer.chat_template else ""
    offsets = tokenizer.codec.backend.encode(text, add_special_tokens=False).offsets
    assert len(offsets) == len(ids)
    flags = [False] + [label != -100 for label in labels[:-1]]  # labels[t] is the target of token t + 1
    runs: list[list[tuple[int, int]]] = []
    for index, flag in enumerate(flags):
        if flag and (not index or not flags[index - 1]):
            runs.append([])
        if flag:
            runs[-1].append(offsets[index])
    return [text[run[0][0] : run[-1][1]] for run in runs]


# The text under each run of loss tokens, where a token crosses a span's edge: Mistral's "▁I" holds the template's
# space and the reply's first letter (transformers' assistant mask takes such a token too); before " ok" the
# template's space is a "▁" of its own.
TOKEN_RUNS = {"mistral": [" I am fine.\n\nThanks</s>", " ok 🙂\n</s>"]}


@pytest.mark.parametrize("family", ["chatml", "llama3", "mistral", "chatml_generation"])
def test_loss_spans_are_the_assistant_text_and_its_end_of_turn(family: str) -> None:
    tokenizer = family_chat_tokenizer(family)
    assert tokenizer.codec is not None
    assert tokenizer.codec.spans(CONVERSATION) == _spans(EXPECTED[family])
    runs = TOKEN_RUNS.get(family, [piece for piece, trained in EXPECTED[family] if trained])
    assert _trained_runs(tokenizer, CONVERSATION) == runs


def _chatml(source: str) -> ChatTokenizer:
    return ChatTokenizer(
        family_tokenizer("bytelevel", CHATML_SPECIALS, ["hi"]), chat_template=JinjaChatTemplate(source)
    )


def test_a_template_that_is_not_prefix_stable_gets_its_spans_from_markers_or_by_substitution() -> None:
    # "A chat of 3 messages" up to the first reply, "A chat of 5 messages" in the whole conversation
    with_markers = family_chat_tokenizer("chatml_generation")
    assert with_markers.chat_template is not None and with_markers.chat_template.has_generation_markers
    plain = CHATML_GENERATION.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    without = _chatml(plain)
    assert with_markers.codec is not None and without.codec is not None
    assert without.codec._prefix_spans(CONVERSATION, plain) is None
    assert with_markers.codec.spans(CONVERSATION) == _spans(EXPECTED["chatml_generation"])
    assert without.codec.spans(CONVERSATION) == _spans(EXPECTED["chatml_generation"])


def test_a_template_that_moves_the_system_prompt_gets_its_spans_by_substitution() -> None:
    # The system message joins the user turn when it is the last message: in the generation prompt, never in a
    # conversation that ends with a reply (transformers renders the same).
    tokenizer = family_chat_tokenizer("mistral_v3")
    assert tokenizer.codec is not None
    assert tokenizer.codec.spans(CONVERSATION) == _spans(
        [
            ("<s>[INST] Hello there[/INST] ", False),
            ("I am fine.\n\nThanks</s>", True),
            ("[INST]   leading spaces[/INST] ", False),
            (" ok 🙂\n</s>", True),
        ]
    )
    prompt = tokenizer.chat_template.render(CONVERSATION[:2], add_generation_prompt=True)  # type: ignore[union-attr]
    assert prompt == "<s>[INST] Be brief.\n\nHello there[/INST]"
    # prefix-stable without a system message: the same span by incremental rendering
    assert tokenizer.codec._prefix_spans(CONVERSATION[1:3], "") is None  # not a prefix of ""
    assert tokenizer.codec.spans(CONVERSATION[1:3]) == _spans(
        [("<s>[INST] Hello there[/INST] ", False), ("I am fine.\n\nThanks</s>", True)]
    )


def test_qwen3_style_think_blocks_get_their_spans_by_substitution() -> None:
    tokenizer = family_chat_tokenizer("qwen3_style")
    assert tokenizer.codec is not None
    thinking = [*CONVERSATION, Message("user", "more?"), Message("assistant", "<think>\nhmm\n</think>\n\nyes")]
    head = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    middle = "\n<|im_start|>user\n  leading spaces<|im_end|>\n<|im_start|>assistant\n"
    # the last reply gets an empty think block from the template, which is not the reply's: no loss on it
    assert tokenizer.codec.spans(CONVERSATION) == _spans(
        [
            (head, False),
            ("I am fine.\n\nThanks<|im_end|>", True),
            (middle + "<think>\n\n</think>\n\n", False),
            (" ok 🙂\n<|im_end|>", True),
            ("\n", False),
        ]
    )
    # a reply that thinks: the template writes "<think>\n" itself, the characters are the reply's all the same
    assert tokenizer.codec.spans(thinking) == _spans(
        [
            (head, False),
            ("I am fine.\n\nThanks<|im_end|>", True),
            (middle, False),
            (" ok 🙂\n<|im_end|>", True),
            ("\n<|im_start|>user\nmore?<|im_end|>\n<|im_start|>assistant\n", False),
            ("<think>\nhmm\n</think>\n\nyes<|im_end|>", True),
            ("\n", False),
        ]
    )


@pytest.mark.parametrize(
    ("loop", "why"),
    [
        # renders the last reply a second time, in a header that changes as the conversation grows
        ("{{ 'Last: ' + messages[-1].content + '<|im_end|>' }}{% for m in messages %}"
         "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>' }}{% endfor %}", "not prefix-stable"),
        # changes the reply's text
        ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content | replace('fine', 'FINE') }}"
         "{{ '<|im_end|>' }}{% endfor %}", "the template changed it"),
    ],
)  # fmt: skip
def test_a_reply_that_cannot_be_located_exactly_skips_the_record_with_e121(loop: str, why: str) -> None:
    tokenizer = _chatml(loop)
    assert tokenizer.codec is not None
    (refused,) = tokenizer.codec.encode_docs([CONVERSATION[1:3]])
    assert isinstance(refused, DataError) and refused.code == "E121" and why in refused.message
    line = json.dumps({"messages": [{"role": m.role, "content": m.content} for m in CONVERSATION[1:3]]}).encode()
    (skipped,) = DocEncoder(tokenizer).encode_lines([(7, line)])  # the encoder reports it with its line number
    assert isinstance(skipped, SkippedLine)
    assert (skipped.line_no, skipped.code) == (7, "E121")
    assert why in skipped.reason


def test_train_on_all_targets_every_token_after_the_first() -> None:
    tokenizer = family_chat_tokenizer("chatml")
    ids, labels = tokenizer.encode_conversation(CONVERSATION, train_on="all")
    assert labels == [*ids[1:], -100]


def _lines(*conversations: list[Message]) -> list[tuple[int, bytes]]:
    rows = [{"messages": [{"role": m.role, "content": m.content} for m in c]} for c in conversations]
    return [(n, json.dumps(row).encode()) for n, row in enumerate(rows, start=1)]


def test_a_conversation_the_template_rejects_is_skipped_with_e120() -> None:
    tokenizer = family_chat_tokenizer("gemma2")  # raise_exception('System role not supported')
    out = DocEncoder(tokenizer).encode_lines(_lines(CONVERSATION, CONVERSATION[1:]))
    skipped, doc = out
    assert isinstance(skipped, SkippedLine)
    assert (skipped.line_no, skipped.code) == (1, "E120")
    assert "System role not supported" in skipped.reason
    assert not isinstance(doc, SkippedLine) and doc is not None
    ids, target = doc
    text = (
        "<bos><start_of_turn>user\nHello there<end_of_turn>\n<start_of_turn>model\nI am fine.\n\nThanks<end_of_turn>\n"
        "<start_of_turn>user\nleading spaces<end_of_turn>\n<start_of_turn>model\nok 🙂<end_of_turn>\n"
    )
    assert tokenizer.decode(ids.tolist(), skip_special=False) == text
    targets = [int(i) for i, t in zip(ids[1:], target[:-1], strict=True) if t]
    expected = tokenizer.encode_conversation(CONVERSATION[1:])[1]
    assert targets == [label for label in expected if label != -100]
    assert tokenizer.decode(targets, skip_special=False) == "I am fine.\n\nThanks<end_of_turn>ok 🙂<end_of_turn>"


def test_a_sandbox_refusal_during_data_is_fatal() -> None:
    # renders like ChatML, but reaches for Python internals once a conversation has more than two messages
    evil = "{% if messages | length > 2 %}{{ ''.__class__.__mro__ }}{% endif %}" + (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
    )
    backend = family_tokenizer("bytelevel", CHATML_SPECIALS, ["hello"])
    tokenizer = ChatTokenizer(backend, chat_template=JinjaChatTemplate(evil))
    encoder = DocEncoder(tokenizer)
    with pytest.raises(SandboxError, match="__class__") as err:
        encoder.encode_lines(_lines(CONVERSATION[1:3], CONVERSATION))
    assert err.value.code == "E120"


def test_a_template_without_an_end_of_turn_token_is_e121() -> None:
    plain = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    backend = family_tokenizer("bytelevel", CHATML_SPECIALS, ["hello"])
    with pytest.raises(DataError, match="no special token after the assistant") as err:
        ChatTokenizer(backend, chat_template=JinjaChatTemplate(plain))
    assert err.value.code == "E121"


@pytest.mark.parametrize(
    ("family", "stops", "pad"),
    [
        ("chatml", {"<|im_end|>"}, "<|endoftext|>"),
        ("llama3", {"<|eot_id|>"}, "<|eot_id|>"),
        ("gemma2", {"<end_of_turn>", "<eos>"}, "<pad>"),
    ],
)
def test_stop_ids_are_the_end_of_turn_and_eos(family: str, stops: set[str], pad: str) -> None:
    tokenizer = family_chat_tokenizer(family)
    assert tokenizer.stop_ids == {tokenizer.token_id(token) for token in stops}
    assert tokenizer.pad_id == tokenizer.token_id(pad)


def test_a_token_is_a_target_when_its_characters_overlap_a_span() -> None:
    offsets = [(0, 3), (3, 5), (5, 9), (9, 9), (9, 12), (12, 14), (14, 20), (20, 21)]
    spans = [(4, 9), (12, 14), (20, 21)]
    # (3, 5) straddles a span's start, (9, 9) is zero-width just after one, (14, 20) starts where one ends
    assert target_flags(offsets, spans).tolist() == [False, True, True, False, False, True, False, True]
    assert target_flags(offsets, []).tolist() == [False] * 8


def test_worker_processes_tokenize_with_the_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lumina_ds.data.prepare import tokenize as prepare_module
    from lumina_ds.data.prepare.tokenize import EncodeSettings, tokenize_source

    tokenizer = family_chat_tokenizer("gemma2")
    good, refused = CONVERSATION[1:], CONVERSATION  # Gemma refuses the system turn: E120, line skipped
    lines = _lines(*[good if n % 3 else refused for n in range(60)])
    path = tmp_path / "chats.jsonl"
    path.write_bytes(b"\n".join(raw for _, raw in lines) + b"\n")
    monkeypatch.setattr(prepare_module, "IN_PROCESS_BYTES", 0)  # spawn the worker pool on a small file
    docs, report = tokenize_source(path, EncodeSettings.of(tokenizer), num_workers=2, shard_bytes=2_000)
    assert len(docs.parts) > 1
    assert (report.conversations, report.skipped) == (40, 20)
    assert {s.code for s in report.skipped_examples} == {"E120"}
    assert [s.line_no for s in report.skipped_examples] == list(range(1, 60, 3))
    assert tokenizer.codec is not None
    expected_ids, expected_target = tokenizer.codec.encode_doc(good)
    for index in (1, 2, 58):
        doc = docs.doc(index)
        assert doc is not None and doc[0].tolist() == expected_ids.tolist()
        assert doc[1].tolist() == expected_target.tolist()
    assert docs.doc(0) is None and docs.doc(57) is None  # lines 1 and 58: skipped
