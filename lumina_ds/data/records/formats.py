"""Record formats: OpenAI messages, ShareGPT, Alpaca and prompt/completion records, each read as one conversation.

A source's format is detected from its first recognisable record (or its table's columns) or forced with
`--data-format`; `--data-fields` renames the fields a format reads. Every record is converted to the messages object
that checks.py validates, so one set of checks (roles, order, encoding) covers every format, and a record of another
format than its source's is an error with its row number (E112) rather than a silent guess.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lumina_ds.config.run import DATA_FORMATS
from lumina_ds.errors import ConfigError

MESSAGES, SHAREGPT, ALPACA, PROMPT_COMPLETION = "messages", "sharegpt", "alpaca", "prompt-completion"
FORMATS = (MESSAGES, SHAREGPT, ALPACA, PROMPT_COMPLETION)
assert ("auto", *FORMATS) == DATA_FORMATS, "config/run.py lists the formats for --data-format"
TITLES = {MESSAGES: "OpenAI messages", SHAREGPT: "ShareGPT", ALPACA: "Alpaca", PROMPT_COMPLETION: "prompt/completion"}
# fields of a record each format needs, then those it reads when present (our names: --data-fields maps them)
REQUIRED: dict[str, tuple[str, ...]] = {
    MESSAGES: ("messages",),
    SHAREGPT: ("conversations",),
    ALPACA: ("instruction", "output"),
    PROMPT_COMPLETION: ("prompt", "completion"),
}
OPTIONAL: dict[str, tuple[str, ...]] = {
    MESSAGES: (),
    SHAREGPT: ("system",),
    ALPACA: ("input", "system", "history"),
    PROMPT_COMPLETION: ("system",),
}
TURN_FIELDS = ("role", "content", "from", "value")  # keys inside a turn: messages / ShareGPT
FIELD_NAMES = tuple(sorted({*TURN_FIELDS, *(f for fs in (*REQUIRED.values(), *OPTIONAL.values()) for f in fs)}))
# ShareGPT speakers; the canonical roles pass through checks.py's aliases
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "chatgpt": "assistant"}
# tool calls and results: lumina-ds' chat template has no turn for them (E114)
TOOL_ROLES = frozenset({"function_call", "observation", "tool", "function", "tool_call", "tool_response", "ipython"})

Problem = tuple[str, str]  # (kind in checks.KINDS, reason)


def parse_fields(spec: str | None) -> tuple[tuple[str, str], ...]:
    """`instruction=question,output=answer` -> ((our field, the data's field), ...); E002 for an unknown field."""
    pairs: dict[str, str] = {}
    for item in (part.strip() for part in (spec or "").split(",")):
        if not item:
            continue
        ours, _, theirs = item.partition("=")
        ours, theirs = ours.strip(), theirs.strip()
        if ours not in FIELD_NAMES or not theirs or ours in pairs:
            problem = "repeated" if ours in pairs else "not FIELD=COLUMN" if not theirs else "an unknown field"
            raise ConfigError(
                "E002",
                f"--data-fields {item!r}: {problem}",
                f"write OUR=THEIRS pairs, e.g. instruction=question,output=answer; fields: {', '.join(FIELD_NAMES)}",
            )
        pairs[ours] = theirs
    return tuple(sorted(pairs.items()))


@dataclass(frozen=True)
class RecordFormat:
    """How the records of a source are read: the format ("auto": each record's own) and renamed fields.

    `origin` says how a source's format was decided ("detected from line 3", "forced by --data-format"), for errors.
    """

    name: str = "auto"
    fields: tuple[tuple[str, str], ...] = ()
    origin: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.name not in DATA_FORMATS:
            raise ConfigError("E002", f"unknown data format {self.name!r}", f"choose one of {', '.join(DATA_FORMATS)}")

    def key(self, ours: str) -> str:
        """The data's name for one of our fields."""
        for name, theirs in self.fields:
            if name == ours:
                return theirs
        return ours

    @property
    def plain(self) -> bool:
        """Messages records under their own names: read exactly as before formats existed."""
        return self.name in ("auto", MESSAGES) and not self.fields

    def columns(self, name: str) -> list[str]:
        """The data's names of every field format `name` reads."""
        return [self.key(f) for f in (*REQUIRED[name], *OPTIONAL[name])]

    def detect(self, keys: Any) -> str | None:
        """The first format whose required fields are all among `keys` (a record or a table's columns)."""
        for name in FORMATS:
            if all(self.key(f) in keys for f in REQUIRED[name]):
                return name
        return None


AUTO = RecordFormat()  # each record's own format (a source's is decided once: data/sources.py)


def to_messages(obj: object, fmt: RecordFormat) -> dict[str, Any] | Problem:
    """A decoded record as the messages object checks.py validates, or (kind, reason) when it cannot be read.

    Messages records under their own names are returned as they are (no copy). A record that is no object is
    returned too: checks.py reports it.
    """
    if not isinstance(obj, dict) or (fmt.plain and "messages" in obj):
        return obj  # type: ignore[return-value]  # checks.py reports a non-object
    name = fmt.name if fmt.name != "auto" else fmt.detect(obj) or MESSAGES
    missing = [f for f in REQUIRED[name] if obj.get(fmt.key(f)) is None]
    if missing:
        return _missing(obj, fmt, name, missing)
    if name == MESSAGES:
        turns = obj[fmt.key("messages")]
        return {"messages": _turns(turns, fmt, "role", "content") if isinstance(turns, list) else turns}
    if name == SHAREGPT:
        return _sharegpt(obj, fmt)
    if name == ALPACA:
        return _alpaca(obj, fmt)
    return _prompt_completion(obj, fmt)


def _missing(obj: dict[str, Any], fmt: RecordFormat, name: str, missing: list[str]) -> Problem:
    """Why a record lacks its format's fields: another format's record (E112), or a field absent or null (E102)."""
    other = fmt.detect({k for k, v in obj.items() if v is not None})
    if other is not None and other != name and fmt.name != "auto":
        found = ", ".join(repr(fmt.key(f)) for f in REQUIRED[other])
        return "format_mismatch", (
            f"record is {TITLES[other]} ({found}), but this source's records are {TITLES[name]} ({fmt.origin})"
        )
    keys = ", ".join(repr(k) for k in list(obj)[:8]) + (", ..." if len(obj) > 8 else "")
    theirs = fmt.key(missing[0])
    what = f"{theirs!r} is null" if theirs in obj else f"object has no {theirs!r} field"
    if name == MESSAGES and fmt.name == "auto":
        return "missing_messages", (
            f"{what} (fields: {keys or 'none'}), nor 'conversations', 'instruction' + 'output' or 'prompt' + "
            "'completion' (name yours with --data-fields)"
        )
    kind = "missing_messages" if name == MESSAGES else "missing_field"
    return kind, f"{what} ({TITLES[name]}, {fmt.origin or 'detected'}; fields: {keys})"


def _turns(items: list[object], fmt: RecordFormat, role: str, content: str) -> list[object]:
    """Turns renamed to role/content (a turn that is no object is left for checks.py to report)."""
    role_key, content_key = fmt.key(role), fmt.key(content)
    out: list[object] = []
    for item in items:
        if not isinstance(item, dict):
            out.append(item)
            continue
        turn = {}
        if role_key in item:
            turn["role"] = item[role_key]
        if content_key in item:
            turn["content"] = item[content_key]
        out.append(turn)
    return out


def _system(obj: dict[str, Any], fmt: RecordFormat) -> list[dict[str, Any]]:
    """The optional system field as a first turn (absent, null or empty: none)."""
    system = obj.get(fmt.key("system"))
    return [{"role": "system", "content": system}] if system not in (None, "") else []


def _sharegpt(obj: dict[str, Any], fmt: RecordFormat) -> dict[str, Any] | Problem:
    items = obj[fmt.key("conversations")]
    if not isinstance(items, list):
        return "messages_not_list", f"{fmt.key('conversations')!r} is a {type(items).__name__}, not a list"
    turns = _turns(items, fmt, "from", "value")
    for index, turn in enumerate(turns):
        role = turn.get("role") if isinstance(turn, dict) else None
        if not isinstance(turn, dict) or not isinstance(role, str):
            continue
        if role.strip().lower() in TOOL_ROLES:
            return "tool_role", (
                f"{fmt.key('conversations')}[{index}] is a {role!r} turn (a tool call or its result); lumina-ds' chat "
                "template has system, user and assistant turns only"
            )
        turn["role"] = _SHAREGPT_ROLES.get(role.strip().lower(), role)
    return {"messages": [*_system(obj, fmt), *turns]}


def _text(obj: dict[str, Any], fmt: RecordFormat, ours: str) -> str | Problem:
    """A string field ("" when absent or null)."""
    value = obj.get(fmt.key(ours))
    if value is None:
        return ""
    if not isinstance(value, str):
        return "wrong_type", f"{fmt.key(ours)!r} is a {type(value).__name__}, not a string"
    return value


def _alpaca(obj: dict[str, Any], fmt: RecordFormat) -> dict[str, Any] | Problem:
    texts: dict[str, str] = {}
    for ours in ("instruction", "input", "output"):
        value = _text(obj, fmt, ours)
        if isinstance(value, tuple):
            return value
        texts[ours] = value
    history = obj.get(fmt.key("history")) or []
    pairs = isinstance(history, list) and all(
        isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(t, str) for t in p) for p in history
    )
    if not pairs:
        return "wrong_type", f"{fmt.key('history')!r} is not a list of [instruction, response] pairs of strings"
    turns: list[dict[str, Any]] = [*_system(obj, fmt)]
    for query, response in history:
        turns += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
    prompt = "\n".join(t for t in (texts["instruction"], texts["input"]) if t)  # as LLaMA-Factory joins them
    turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": texts["output"]}]
    return {"messages": turns}


def _prompt_completion(obj: dict[str, Any], fmt: RecordFormat) -> dict[str, Any] | Problem:
    """Text prompt and completion, or conversational ones: lists of messages (as TRL writes them)."""
    prompt, completion = obj[fmt.key("prompt")], obj[fmt.key("completion")]
    if isinstance(prompt, list) and isinstance(completion, list):
        return {"messages": [*_system(obj, fmt), *_turns([*prompt, *completion], fmt, "role", "content")]}
    for ours, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str):
            return "wrong_type", f"{fmt.key(ours)!r} is a {type(value).__name__}, not a string (or both lists)"
    user, assistant = {"role": "user", "content": prompt}, {"role": "assistant", "content": completion}
    return {"messages": [*_system(obj, fmt), user, assistant]}


@dataclass(frozen=True, slots=True)
class Row:
    """One decoded record of a table (Parquet, Arrow) or of a JSON array, as a data line is its bytes."""

    value: object
