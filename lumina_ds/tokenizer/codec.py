"""Conversations -> token ids and loss targets with a model's own chat template: the loss falls on exactly each
assistant reply's text as rendered and the end-of-turn token(s) the template writes after it.

Spans come from the template's `{% generation %}` blocks when it has them. Otherwise each assistant turn is found by
rendering prefixes: the conversation before it with the generation prompt, and up to it without; both must be
prefixes of the whole rendered conversation. A template that is not prefix-stable (Qwen3 drops the empty think block
of earlier turns, Mistral v0.3 moves the system prompt into the last user turn) has each assistant content located by
substitution instead: the conversation rendered again with that content replaced differs from it in exactly the
content's characters, or the record is E121 (nothing is guessed). The rendered text is tokenized once, as
transformers does, and a token is a target when its characters overlap a span.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tokenizers import Encoding, Tokenizer

from lumina_ds.batch import IGNORE_INDEX
from lumina_ds.errors import DataError
from lumina_ds.tokenizer.chat_format import EncodedDoc, Message
from lumina_ds.tokenizer.jinja import JinjaChatTemplate, SandboxError

Span = tuple[int, int]
_PROBE = (Message("user", "Hi"), Message("assistant", "Hello"))
_STABLE_HINT = (
    "train with lumina-ds' own format (a --tokenizer without chat template), or use a template that writes each reply "
    "once and unchanged, followed by a special token, or mark replies with {% generation %}...{% endgeneration %}"
)


def _after_tokens(text: str, pos: int, added: Sequence[str]) -> int:
    """End of the run of added-token strings that starts at pos (pos when none does)."""
    while token := next((t for t in added if text.startswith(t, pos)), None):
        pos += len(token)
    return pos


def _turn_span(text: str, start: int, content: str, added: Sequence[str]) -> Span | None:
    """In text[start:], the last occurrence of content (or of it stripped, for templates that trim) that is followed
    by added tokens: from the content through those tokens (its end-of-turn). None when there is no such occurrence."""
    for candidate in dict.fromkeys((content, content.strip())):
        stop = len(text)
        while (found := text.rfind(candidate, start, stop)) >= 0:
            content_end = found + len(candidate)
            end = _after_tokens(text, content_end, added)
            if end > content_end:
                return found, end
            stop = content_end - 1
    return None


def _ends_at(text: str, content: str, first: int, end: int) -> bool:
    """Is content the text that ends at end and covers the first changed character? (The template may write text equal
    to the content's start, e.g. Qwen3's "<think>\\n", so the first difference can lie inside the content.)"""
    return end - len(content) <= first and text.startswith(content, end - len(content)) and end - len(content) >= 0


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix (binary search over slice comparisons, which run in C)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if a[:middle] == b[:middle] else (low, middle - 1)
    return low


def target_flags(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> np.ndarray:
    """Per token: do its characters overlap one of the (sorted, disjoint) spans? (transformers' assistant mask rule;
    a zero-width token counts as one character)."""
    if not spans or not offsets:
        return np.zeros(len(offsets), dtype=bool)
    chars = np.asarray(offsets, dtype=np.int64)  # [T, 2]
    bounds = np.asarray(spans, dtype=np.int64)  # [S, 2]
    first = np.searchsorted(bounds[:, 1], chars[:, 0], side="right")  # first span ending after the token starts
    inside = first < len(bounds)
    reach = np.maximum(chars[:, 1], chars[:, 0] + 1)
    return inside & (reach > bounds[np.minimum(first, len(bounds) - 1), 0])


class TemplateCodec:
    """Encodes conversations for training and prompts for chat with a JinjaChatTemplate and its tokenizer."""

    def __init__(self, template: JinjaChatTemplate, tokenizer: Tokenizer) -> None:
        self.template = template
        # A fresh copy: in rendered text, special-token strings are control tokens (transformers' behaviour).
        self.backend = Tokenizer.from_str(tokenizer.to_str())
        contents = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.content.strip()}
        self._added = tuple(sorted(contents, key=len, reverse=True))  # longest match first
        self.end_of_turn = self._probe_end_of_turn()
        self.end_id = self._id(self.end_of_turn)
        eos = template.special_tokens.get("eos_token")
        self.stop_ids = frozenset({self.end_id} | ({self._id(eos)} if eos and self._known(eos) else set()))
        pad = template.special_tokens.get("pad_token")
        self.pad_id = self._id(pad) if pad and self._known(pad) else min(self.stop_ids)

    def _known(self, token: str) -> bool:
        return self.backend.token_to_id(token) is not None

    def _id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        assert token_id is not None, f"{token!r} is not in the vocabulary"
        return int(token_id)

    def _probe_end_of_turn(self) -> str:
        """The first special token after an assistant message's content: where generation stops."""
        text, reply = self.template.render(_PROBE), _PROBE[-1].content
        span = _turn_span(text, 0, reply, self._added)
        if span is None:
            raise DataError(
                "E121",
                "the chat template puts no special token after the assistant's content, so a reply has no end",
                _STABLE_HINT,
            )
        return next(t for t in self._added if text.startswith(t, span[0] + len(reply)))

    def spans(self, messages: Sequence[Message]) -> tuple[str, list[Span]]:
        """The rendered conversation and the character spans of its assistant turns (E120/E121 on failure)."""
        if self.template.has_generation_markers:
            text, spans = self.template.render_tracked(messages)
            if not spans and any(m.role == "assistant" for m in messages):
                raise DataError("E121", "the template's {% generation %} blocks marked no assistant text", _STABLE_HINT)
            return text, spans
        text = self.template.render(messages)
        prefixed = self._prefix_spans(messages, text)
        return text, prefixed if prefixed is not None else self._substituted_spans(messages, text)

    def _prefix_spans(self, messages: Sequence[Message], text: str) -> list[Span] | None:
        """Each reply, found after its generation prompt, through its end-of-turn; None if not prefix-stable."""
        spans = []
        for index, message in enumerate(messages):
            if message.role != "assistant":
                continue
            prompt = self.template.render(messages[:index], add_generation_prompt=True)
            turn = self.template.render(messages[: index + 1])
            if not (turn.startswith(prompt) and text.startswith(turn)):
                return None
            span = _turn_span(turn, len(prompt), message.content, self._added)
            if span is None:
                raise DataError(
                    "E121",
                    f"message {index + 1} (assistant): its content is not followed by an end-of-turn token in the "
                    "rendered text (the template changed it)",
                    _STABLE_HINT,
                )
            spans.append(span)
        return spans

    def _substituted_spans(self, messages: Sequence[Message], text: str) -> list[Span]:
        """Each assistant content through its end-of-turn, located where text and the text rendered with that content
        replaced differ (E121 when they differ elsewhere too, or the template changed the content)."""
        spans = []
        for index, message in enumerate(messages):
            if message.role != "assistant":
                continue
            content = message.content.strip()
            stand_in = next(c for c in "XYZ" if not content.startswith(c) and not content.endswith(c))
            changed = [*messages[:index], Message("assistant", stand_in), *messages[index + 1 :]]
            other = self.template.render(changed)
            start = _common_prefix(text, other)
            end = len(text) - _common_prefix(text[start:][::-1], other[start:][::-1])
            start = next((end - len(c) for c in (message.content, content) if _ends_at(text, c, start, end)), -1)
            stop = _after_tokens(text, end, self._added)
            if start < 0 or stop == end:
                raise DataError(
                    "E121",
                    f"the chat template is not prefix-stable, and the content of message {index + 1} (assistant) "
                    "cannot be located in the rendered conversation (the template changes it, renders it in more "
                    "than one place, or puts no special token after it)",
                    _STABLE_HINT,
                )
            spans.append((start, stop))
        return spans

    def _layout(self, messages: Sequence[Message], train_all: bool) -> tuple[str, list[Span] | None]:
        """The rendered conversation and its loss spans (None: every token after the first)."""
        return (self.template.render(messages), None) if train_all else self.spans(messages)

    def _flags(self, offsets: Sequence[tuple[int, int]], spans: list[Span] | None) -> np.ndarray:
        if spans is None:
            return np.arange(len(offsets)) > 0
        return target_flags(offsets, spans)

    def encode(self, messages: Sequence[Message], *, train_all: bool = False) -> tuple[list[int], list[bool]]:
        """Token ids of the rendered conversation and, per token, whether it is a training target."""
        text, spans = self._layout(messages, train_all)
        encoding = self.backend.encode(text, add_special_tokens=False)
        return list(encoding.ids), self._flags(encoding.offsets, spans).tolist()

    def encode_conversation(
        self, messages: Sequence[Message], *, train_on: str = "assistant"
    ) -> tuple[list[int], list[int]]:
        """`input_ids` and pre-shifted `labels`, as ChatTemplate.encode_conversation returns them."""
        ids, flags = self.encode(messages, train_all=train_on == "all")
        labels = [ids[t + 1] if flags[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)]
        return ids, [*labels, IGNORE_INDEX]

    def encode_doc(self, messages: Sequence[Message], *, train_all: bool = False) -> EncodedDoc:
        """One conversation -> document (target[t] = 1 when position t predicts ids[t + 1]); E120/E121 raise."""
        text, spans = self._layout(messages, train_all)
        return self._doc(self.backend.encode(text, add_special_tokens=False), spans)

    def _doc(self, encoding: Encoding, spans: list[Span] | None) -> EncodedDoc:
        target = np.zeros(len(encoding.ids), dtype=np.uint8)
        target[:-1] = self._flags(encoding.offsets, spans)[1:]
        return np.asarray(encoding.ids, dtype=np.int32), target

    def encode_docs(
        self, conversations: Sequence[Sequence[Message]], *, train_all: bool = False
    ) -> list[EncodedDoc | DataError]:
        """A document per conversation, or the DataError (E120/E121) for one the template rejects; one tokenizer call
        for all. A sandbox refusal is fatal (SandboxError is raised)."""
        layouts: list[tuple[str, list[Span] | None] | DataError] = []
        for messages in conversations:
            try:
                layouts.append(self._layout(messages, train_all))
            except SandboxError:
                raise
            except DataError as exc:
                layouts.append(exc)
        texts = [item[0] for item in layouts if not isinstance(item, DataError)]
        encodings = iter(self.backend.encode_batch(texts, add_special_tokens=False) if texts else [])
        return [item if isinstance(item, DataError) else self._doc(next(encodings), item[1]) for item in layouts]

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        """The conversation plus the template's generation prompt; the model then generates until a stop id."""
        text = self.template.render(messages, add_generation_prompt=True)
        return list(self.backend.encode(text, add_special_tokens=False).ids)
