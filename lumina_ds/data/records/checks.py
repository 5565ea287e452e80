"""The per-line data checks, one implementation shared by the training reader and `validate-data`.

A line is checked once, in a single pass over its messages. Errors make training skip the line (the first error is
reported); warnings leave the line in training. See KINDS for every problem with its code and severity.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lumina_ds.config.run import MAX_LINE_BYTES, MIN_LINE_BYTES
from lumina_ds.data.records.files import UTF8_BOM, LongLine
from lumina_ds.data.records.formats import AUTO, RecordFormat, Row, to_messages
from lumina_ds.errors import ConfigError, DataError
from lumina_ds.tokenizer import Message, known_roles, normalize_role

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True)
class LineLimit:
    """How records are read: the longest line (bytes, line end not counted), whether a longer one is cut instead of
    skipped, and the record format (data/formats.py)."""

    max_bytes: int = MAX_LINE_BYTES
    truncate: bool = False
    record_format: RecordFormat = AUTO

    def __post_init__(self) -> None:
        if self.max_bytes < MIN_LINE_BYTES:
            raise ConfigError("E002", f"--max-line-bytes must be at least {MIN_LINE_BYTES}, got {self.max_bytes}")


DEFAULT_LIMIT = LineLimit()
RawRecord = bytes | LongLine | Row  # a JSONL line as read (a LongLine past the limit), or a table's row


@dataclass(frozen=True)
class Kind:
    """One kind of problem: stable name, code, severity, what `--fix-errors` does, and what the user can do."""

    name: str
    code: str
    severity: str
    title: str
    fix: str
    hint: str


_REJECT = "rejected"
_MESSAGES = 'Write {"messages": [{"role": ..., "content": ...}, ...]}.'
_TOO_LONG_HINT = "Split the conversation, raise --max-line-bytes, or pass --truncate-long to cut it."
_CUT_HINT = "Split the conversation or raise --max-line-bytes."
_FIELDS = "Name the data's fields with --data-fields (e.g. instruction=question,output=answer)."
_ONE_FORMAT = "One record format per file: split the file, or convert its records to one format."
_TOOLS = "Drop tool turns, or write the tool call and result into the assistant and user turns."
_ORDER = "Optional system message first, then user and assistant turns alternating, ending with an assistant turn."
KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("invalid_json", "E101", ERROR, "not valid JSON", _REJECT, "One JSON object per line; check quotes."),
        Kind("not_object", "E101", ERROR, "line is not a JSON object", _REJECT, _MESSAGES),
        Kind("missing_messages", "E102", ERROR, "no 'messages' field", _REJECT, _MESSAGES),
        Kind("missing_field", "E102", ERROR, "a field its format needs is missing", _REJECT, _FIELDS),
        Kind("format_mismatch", "E112", ERROR, "another record format than its source's", _REJECT, _ONE_FORMAT),
        Kind("tool_role", "E114", ERROR, "tool call or tool result turn", _REJECT, _TOOLS),
        Kind("messages_not_list", "E101", ERROR, "'messages' is not a list", _REJECT, _MESSAGES),
        Kind("empty_messages", "E102", ERROR, "'messages' is empty", _REJECT, "Add a user and an assistant message."),
        Kind("message_not_object", "E101", ERROR, "a message is not an object", _REJECT, _MESSAGES),
        Kind("missing_role", "E102", ERROR, "a message has no 'role'", _REJECT, 'Each message needs "role".'),
        Kind("missing_content", "E102", ERROR, "a message has no 'content'", _REJECT, 'Each message needs "content".'),
        Kind("wrong_type", "E101", ERROR, "role or content not a string", _REJECT, "Write them as strings."),
        Kind("unknown_role", "E101", ERROR, "unknown role", _REJECT, "Use user, assistant or system (or an alias)."),
        Kind("role_order", "E101", ERROR, "roles out of order", _REJECT, _ORDER),
        Kind("invalid_utf8", "E103", ERROR, "invalid UTF-8 or lone surrogate", _REJECT, "Re-encode the file as UTF-8."),
        Kind("replacement_char", "E103", ERROR, "U+FFFD replacement character", _REJECT, "Re-export it as UTF-8."),
        Kind("control_char", "E103", ERROR, "control character", "removed", "Run validate-data --fix-errors."),
        Kind("no_assistant_content", "E102", ERROR, "all assistant messages empty", _REJECT, "Write replies."),
        Kind("empty_content", "W102", WARNING, "empty message (dropped)", "message dropped", "Drop empty messages."),
        Kind("duplicate", "W104", WARNING, "duplicate conversation", "later copies dropped", "Deduplicate the data."),
        Kind("role_alias", "W101", WARNING, "role alias normalized", "canonical role written", "Nothing to do."),
        Kind("whitespace", "W103", WARNING, "leading/trailing whitespace", "trimmed", "Trim message contents."),
        Kind("too_long", "W105", WARNING, "longer than --seq-len (truncated)", "kept", "Raise --seq-len or split it."),
        Kind("line_too_long", "E111", ERROR, "longer than --max-line-bytes", _REJECT, _TOO_LONG_HINT),
        Kind("truncated_long", "W106", WARNING, "longer than --max-line-bytes (contents cut)", "cut", _CUT_HINT),
    )
}


# C0 controls except \t \n \r, DEL, C1 controls, lone surrogates (from "\ud800" escapes) and U+FFFD, in one scan.
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffd]")
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# strict=False: a raw tab or CR inside a string is unambiguous text; other raw controls are caught by _BAD_CHARS.
_decode_json = json.JSONDecoder(strict=False).decode
_CANONICAL_ROLES = frozenset({"user", "assistant", "system"})


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem found on a line."""

    kind: str
    reason: str

    @property
    def code(self) -> str:
        return KINDS[self.kind].code

    @property
    def severity(self) -> str:
        return KINDS[self.kind].severity

    def to_error(self, where: str = "") -> DataError:
        """This issue as the DataError that strict readers raise."""
        return DataError(self.code, f"{where}{self.reason}", KINDS[self.kind].hint)


@dataclass(slots=True)
class LineCheck:
    """What one line holds: the decoded JSON object, the messages training uses (None on error) and the issues."""

    obj: object
    messages: list[Message] | None
    issues: list[Issue]

    @property
    def error(self) -> Issue | None:
        """The error that makes training skip this line, if any."""
        if self.messages is not None:
            return None
        return next(i for i in self.issues if KINDS[i.kind].severity == ERROR)


def _failed(obj: object, issues: list[Issue], kind: str, reason: str) -> LineCheck:
    issues.append(Issue(kind, reason))
    return LineCheck(obj, None, issues)


def _warn(issues: list[Issue], kind: str, reason: str) -> None:
    """Record a warning once per line (the first occurrence says where)."""
    if not any(i.kind == kind for i in issues):
        issues.append(Issue(kind, reason))


def line_size(raw: bytes | LongLine) -> int:
    """Bytes of a line without its `\\n`, the figure --max-line-bytes limits."""
    return raw.size if isinstance(raw, LongLine) else len(raw) - raw.endswith(b"\n")


def is_blank(line_no: int, raw: bytes) -> bool:
    """Whether a line holds only whitespace (after a UTF-8 byte-order mark on line 1): training ignores it."""
    text = (raw.removeprefix(UTF8_BOM) if line_no == 1 else raw).decode("utf-8", errors="replace")
    return not text or text.isspace()


def check_line(line_no: int, raw: RawRecord, limit: LineLimit = DEFAULT_LIMIT) -> LineCheck | None:
    """Check one raw JSONL line (1-based `line_no`) or a table's row; None for a blank line. A line longer than the
    limit is an error (E111), or with `limit.truncate` is checked whole and then has its longest contents cut to fit
    (W106); rows are already decoded, so no byte limit applies to them."""
    if isinstance(raw, Row):
        return check_record(raw.value, limit.record_format)
    size = line_size(raw)
    if size > limit.max_bytes and not limit.truncate:
        reason = f"line is {size:,} bytes, longer than --max-line-bytes {limit.max_bytes:,}"
        return _failed(None, [], "line_too_long", reason)
    assert isinstance(raw, bytes), "a LongLine is only read whole"
    if line_no == 1 and raw.startswith(UTF8_BOM):
        raw = raw[len(UTF8_BOM) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _failed(None, [], "invalid_utf8", f"invalid UTF-8 at byte {exc.start}: {exc.reason}")
    if not text or text.isspace():
        return None
    try:
        obj = _decode_json(text)
    except json.JSONDecodeError as exc:
        return _failed(None, [], "invalid_json", f"invalid JSON: {exc.msg} (column {exc.colno})")
    except (ValueError, RecursionError) as exc:  # numbers with too many digits, absurd nesting
        return _failed(None, [], "invalid_json", f"invalid JSON: {exc}")
    checked = check_record(obj, limit.record_format)
    if size > limit.max_bytes and checked.messages is not None:
        return _cut_to_fit(checked, size, limit.max_bytes)
    return checked


def as_object(messages: Sequence[Message]) -> dict[str, Any]:
    """A conversation as the JSON object of one line."""
    return {"messages": [{"role": m.role, "content": m.content} for m in messages]}


def _json_size(text: str) -> int:
    """UTF-8 bytes of `text` inside a JSON string written with ensure_ascii=False (other controls are errors)."""
    size = len(text) if text.isascii() else len(text.encode("utf-8"))
    return size + sum(text.count(c) for c in '"\\\n\r\t')


def _water_level(sizes: Sequence[int], budget: int) -> int:
    """The largest cap c with sum(min(size, c)) <= budget: the longest contents are cut first, to a common length."""
    remaining = budget
    ordered = sorted(sizes)
    for index, size in enumerate(ordered):
        left = len(ordered) - index
        if size * left > remaining:
            return remaining // left
        remaining -= size
    return max(ordered, default=0)


def _cut(text: str, cap: int) -> str:
    """The longest prefix of `text` whose JSON string size is at most `cap` bytes."""
    high = min(len(text), cap)  # every character is at least one byte
    excess = _json_size(text[:high]) - cap
    if excess <= 0:
        return text[:high]
    low = high - excess  # dropping `excess` characters drops at least `excess` bytes: this prefix fits
    while low < high:  # the longest fitting prefix is in [low, high); sizes grow with the prefix
        middle = (low + high + 1) // 2
        if _json_size(text[:middle]) <= cap:
            low = middle
        else:
            high = middle - 1
    return text[:low]


def _cut_to_fit(checked: LineCheck, size: int, max_bytes: int) -> LineCheck:
    """The conversation with its longest contents cut so that the line it is written back as fits `max_bytes`."""
    assert checked.messages is not None
    messages = checked.messages
    overhead = len(json.dumps(as_object([Message(m.role, "") for m in messages]), ensure_ascii=False).encode())
    sizes = [_json_size(m.content) for m in messages]
    cap = _water_level(sizes, max_bytes - overhead)
    reason = f"line is {size:,} bytes, longer than --max-line-bytes {max_bytes:,}"
    if cap < 1:
        return _failed(
            None, checked.issues, "line_too_long", f"{reason}; its {len(messages)} messages cannot be cut to fit"
        )
    cut = [m if n <= cap else Message(m.role, _cut(m.content, cap)) for m, n in zip(messages, sizes, strict=True)]
    recheck = check_object(as_object(cut))  # a cut can leave an assistant turn of only whitespace
    if recheck.messages is None:
        assert recheck.error is not None
        return _failed(
            None, checked.issues, recheck.error.kind, f"after cutting to --max-line-bytes: {recheck.error.reason}"
        )
    cut_count = sum(n > cap for n in sizes)
    _warn(checked.issues, "truncated_long", f"{reason}: {cut_count} message(s) cut to {cap:,} bytes")
    return LineCheck(as_object(recheck.messages), recheck.messages, checked.issues)


def check_record(obj: object, fmt: RecordFormat) -> LineCheck:
    """Check a decoded record of any format: converted to its messages object (kept as `obj`), then checked."""
    converted = to_messages(obj, fmt)
    if isinstance(converted, tuple):
        return _failed(obj, [], *converted)
    return check_object(converted)


def check_object(obj: object) -> LineCheck:
    """Check a decoded JSON line: structure, roles, encoding, then role order on the non-empty messages."""
    issues: list[Issue] = []
    if not isinstance(obj, dict):
        return _failed(obj, issues, "not_object", f"line is a JSON {type(obj).__name__}, not an object")
    if "messages" not in obj:
        return _failed(obj, issues, "missing_messages", "object has no 'messages' field")
    raw_messages = obj["messages"]
    if not isinstance(raw_messages, list):
        return _failed(obj, issues, "messages_not_list", f"'messages' is a {type(raw_messages).__name__}, not a list")
    if not raw_messages:
        return _failed(obj, issues, "empty_messages", "'messages' is empty")
    kept: list[tuple[int, Message]] = []
    has_assistant = False
    for index, item in enumerate(raw_messages):
        message = _check_message(index, item, issues)
        if message is None:
            return LineCheck(obj, None, issues)
        has_assistant = has_assistant or message.role == "assistant"
        if not message.content or message.content.isspace():
            _warn(issues, "empty_content", f"messages[{index}] ({message.role}) has empty content")
        else:
            kept.append((index, message))
    order_problem = _order_problem(kept, has_assistant)
    if order_problem is not None:
        kind, reason = order_problem
        if any(i.kind == "empty_content" for i in issues) and kind == "role_order":
            reason += " once the empty messages are dropped"
        return _failed(obj, issues, kind, reason)
    return LineCheck(obj, [m for _, m in kept], issues)


def _check_message(index: int, item: object, issues: list[Issue]) -> Message | None:
    """Validate one entry of `messages`; on error append it to `issues` and return None."""
    if not isinstance(item, dict):
        issues.append(Issue("message_not_object", f"messages[{index}] is a {type(item).__name__}, not an object"))
        return None
    if "role" not in item or "content" not in item:
        field = "role" if "role" not in item else "content"
        issues.append(Issue(f"missing_{field}", f"messages[{index}] has no '{field}' field"))
        return None
    role, content = item["role"], item["content"]
    if not isinstance(role, str) or not isinstance(content, str):
        field, value = ("role", role) if not isinstance(role, str) else ("content", content)
        issues.append(Issue("wrong_type", f"messages[{index}].{field} is a {type(value).__name__}, not a string"))
        return None
    canonical = role if role in _CANONICAL_ROLES else normalize_role(role)
    if canonical is None:
        known = ", ".join(known_roles())
        issues.append(Issue("unknown_role", f"messages[{index}] has unknown role {role!r} (known: {known})"))
        return None
    if canonical != role:
        _warn(issues, "role_alias", f"messages[{index}].role {role!r} read as {canonical!r}")
    bad = _BAD_CHARS.search(content)
    if bad is not None:
        issues.append(_bad_char_issue(f"messages[{index}]", bad.group(), bad.start()))
        return None
    if content and (content[0].isspace() or content[-1].isspace()) and not content.isspace():
        _warn(issues, "whitespace", f"messages[{index}].content has leading or trailing whitespace")
    return Message(canonical, content)


def _bad_char_issue(where: str, char: str, offset: int) -> Issue:
    point = f"U+{ord(char):04X}"
    if char == "\ufffd":
        return Issue("replacement_char", f"{where}.content has {point} (text lost in an earlier decoding) at {offset}")
    if "\ud800" <= char <= "\udfff":
        return Issue("invalid_utf8", f"{where}.content has a lone surrogate {point} at {offset}, not valid Unicode")
    return Issue("control_char", f"{where}.content has control character {point} at {offset}")


def _order_problem(kept: list[tuple[int, Message]], has_assistant: bool) -> tuple[str, str] | None:
    """Role order rules: system only first, no two user or assistant turns in a row, end on an assistant turn."""
    if not has_assistant:
        return "role_order", "conversation has no assistant turn"
    if not any(m.role == "assistant" for _, m in kept):
        return "no_assistant_content", "every assistant message is empty"
    previous = -1
    for turn, (index, message) in enumerate(kept):
        if message.role == "system" and turn > 0:
            return "role_order", f"messages[{index}] is a system message; only the first message may be one"
        if turn > 0 and message.role == kept[turn - 1][1].role:
            return "role_order", f"messages[{previous}] and messages[{index}] are both {message.role} turns"
        previous = index
    index, last = kept[-1]
    if last.role != "assistant":
        return "role_order", f"conversation ends with a {last.role} turn (messages[{index}]), not an assistant turn"
    return None


def fix_object(obj: object) -> list[Message] | None:
    """Repair what `--fix-errors` can: canonical roles, control characters removed, contents trimmed.

    Returns None when the line cannot be repaired. The caller re-checks the result with `check_object`, which drops
    the messages that became empty and catches what the repair broke (e.g. an assistant turn that was only control
    characters), so a repair never hides an error.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        return None
    fixed: list[Message] = []
    for item in obj["messages"]:
        if not isinstance(item, dict):
            return None
        role, content = item.get("role"), item.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            return None
        canonical = normalize_role(role)
        if canonical is None:
            return None
        fixed.append(Message(canonical, _CONTROL_CHARS.sub("", content).strip()))
    return fixed
