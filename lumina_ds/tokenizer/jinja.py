"""A model's own chat template (Jinja), rendered as transformers' `apply_chat_template` renders it, in a sandbox.

A template comes from a downloaded model directory, so it is untrusted code: it runs in jinja2's immutable sandbox,
where attribute access to internals (`__class__`, `__globals__`, ...) and changes to the inputs are refused (E120).
The environment is the one transformers builds (trim_blocks, lstrip_blocks, loop controls, `tojson`,
`raise_exception`, `strftime_now`, `{% generation %}` markers), so a template renders to the same text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lumina_ds.errors import DataError
from lumina_ds.tokenizer.chat_format import Message

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# The named special tokens transformers passes to every template (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Unicode noncharacters (never in interchange text) bracket `{% generation %}` output while spans are tracked.
SPAN_OPEN, SPAN_CLOSE = "\ufdd0", "\ufdd1"
_MARKER = re.compile(f"([{SPAN_OPEN}{SPAN_CLOSE}])")
_GENERATION_TAG = re.compile(r"\{%[-+]?\s*generation\b")
_TRACKING: ContextVar[bool] = ContextVar("lumina_chat_template_tracking", default=False)
_SANDBOX_HINT = "the template is refused; use the model's published chat template or write chat_template.jinja"


class SandboxError(DataError):
    """E120: the template tried something the sandbox forbids (always fatal, never a skipped line)."""


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja2 returns an undefined (rendered as "") for an unsafe attribute; here the attempt itself is an error."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} object")


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`: marks text the assistant generates (transformers' AssistantTracker)."""

    tags = frozenset({"generation"})  # type: ignore[assignment]  # jinja2 declares a set; it is only read

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_mark", []), [], [], body).set_lineno(lineno)

    def _mark(self, caller: Any) -> str:
        text = str(caller())
        return f"{SPAN_OPEN}{text}{SPAN_CLOSE}" if _TRACKING.get() else text


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, as transformers' does (no route to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick: `namespace(self=...)` works
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_name(name: object) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"a namespace attribute may not start with '_' (got {name!r})")


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)` without handing the template the dict type itself (as transformers)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # transformers' filter: no HTML escaping, unlike jinja2's own tojson
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)
    env.globals["dict"] = _Dict()
    return env


class JinjaChatTemplate:
    """A Hugging Face chat template plus the special tokens (bos_token, eos_token, ...) it is rendered with."""

    def __init__(self, source: str, *, special_tokens: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if k in SPECIAL_TOKEN_KEYS and v}
        try:
            self._compiled = _environment().from_string(source)
        except TemplateError as exc:
            raise DataError("E120", f"chat template does not compile: {exc}", _SANDBOX_HINT) from exc
        self.has_generation_markers = _GENERATION_TAG.search(source) is not None

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
        """The conversation as text, exactly as `tokenizer.apply_chat_template(..., tokenize=False)` renders it."""
        with _errors_as_codes():
            return str(self._compiled.render(**self._context(messages, add_generation_prompt)))

    def render_tracked(self, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
        """The conversation and the character spans its `{% generation %}` blocks produced."""
        if any(SPAN_OPEN in m.content or SPAN_CLOSE in m.content for m in messages):
            raise DataError("E121", "a message holds U+FDD0/U+FDD1, which mark generation spans", "remove them")
        token = _TRACKING.set(True)
        try:
            marked = self.render(messages)
        finally:
            _TRACKING.reset(token)
        return _strip_markers(marked)

    def _context(self, messages: Sequence[Message], add_generation_prompt: bool) -> dict[str, Any]:
        chat = [{"role": m.role, "content": m.content} for m in messages]
        return {
            **self.special_tokens,
            "messages": chat,
            "tools": None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }

    def to_json(self) -> str:
        """Serialized form (part of the prepared-data cache key, and how worker processes receive it)."""
        return json.dumps({"source": self.source, "special_tokens": self.special_tokens}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JinjaChatTemplate:
        data = json.loads(text)
        return cls(data["source"], special_tokens=data["special_tokens"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JinjaChatTemplate) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.to_json())


@contextmanager
def _errors_as_codes() -> Iterator[None]:
    try:
        yield
    except SecurityError as exc:
        raise SandboxError("E120", f"chat template refused by the sandbox: {exc}", _SANDBOX_HINT) from exc
    except TemplateError as exc:  # raise_exception() in the template, undefined values, ...
        raise DataError("E120", f"chat template error: {exc}", "the template rejects this conversation") from exc
    except (TypeError, ValueError, LookupError, ArithmeticError) as exc:
        raise DataError("E120", f"chat template failed: {type(exc).__name__}: {exc}", _SANDBOX_HINT) from exc


def _strip_markers(marked: str) -> tuple[str, list[tuple[int, int]]]:
    """Remove the span markers; -> clean text and the spans, in clean-text characters (E121 when unbalanced)."""
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    length, start = 0, None
    for part in _MARKER.split(marked):
        if part == SPAN_OPEN and start is None:
            start = length
        elif part == SPAN_CLOSE and start is not None:
            spans.append((start, length))
            start = None
        elif part in (SPAN_OPEN, SPAN_CLOSE):
            start = -1
            break
        else:
            pieces.append(part)
            length += len(part)
    if start is not None:
        raise DataError("E121", "the template's {% generation %} blocks are nested or unbalanced", _SANDBOX_HINT)
    return "".join(pieces), spans


def special_tokens_of(config: Mapping[str, Any]) -> dict[str, str]:
    """Named special tokens of a tokenizer_config.json (a value is a string or an AddedToken dict)."""
    out: dict[str, str] = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        if isinstance(value, Mapping):
            value = value.get("content")
        if isinstance(value, str) and value:
            out[key] = value
    return out


def _template_in_config(value: Any, where: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return str(named["default"])
        raise DataError("E120", f"{where} has chat templates {sorted(map(str, named))} but no 'default'", _SANDBOX_HINT)
    raise DataError("E120", f"{where}: chat_template is a {type(value).__name__}", "expected a string or a list")


def read_tokenizer_config(directory: str | Path) -> dict[str, Any]:
    """tokenizer_config.json of a directory ({} when absent; E120 when it is not a JSON object)."""
    path = Path(directory) / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError("E120", f"cannot read {path}: {exc}", "expected the model's tokenizer_config.json") from exc
    if not isinstance(config, dict):
        raise DataError("E120", f"{path} is not a JSON object", "expected the model's tokenizer_config.json")
    return config


def load_chat_template(directory: str | Path) -> JinjaChatTemplate | None:
    """The chat template of a model directory, as transformers picks it: chat_template.jinja, else
    tokenizer_config.json's `chat_template` (a string, or named templates of which "default" is used); else None."""
    directory = Path(directory)
    config = read_tokenizer_config(directory)
    jinja_file = directory / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        source: str | None = jinja_file.read_text(encoding="utf-8")
    else:
        source = _template_in_config(config.get("chat_template"), directory / TOKENIZER_CONFIG_FILE)
    return None if source is None else JinjaChatTemplate(source, special_tokens=special_tokens_of(config))
