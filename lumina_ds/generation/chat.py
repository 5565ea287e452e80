"""Multi-turn chat on top of generate(): a session with history, an interactive REPL, and one-shot prompts."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any, TextIO

from lumina_ds.errors import DataError, LuminaError
from lumina_ds.generation.loading import InferenceBundle
from lumina_ds.generation.sampling import SamplingConfig, generate
from lumina_ds.models.counting import count_parameters
from lumina_ds.tokenizer import Message

REPLACEMENT_CHAR = "\ufffd"  # what a byte-level decoder yields for an incomplete UTF-8 sequence
UTF8_HINT = "give the prompt as UTF-8 text: convert it (e.g. `iconv -f latin1 -t utf-8`) or use a UTF-8 locale"

HELP = """Commands:
  /help                 show this help
  /reset                forget the conversation (the system prompt stays)
  /system <text>        set the system prompt (no text: remove it)
  /temperature <x>      sampling temperature (0 = greedy)
  /top_p <x>            nucleus mass in (0, 1] (1 = off)
  /top_k <n>            keep the n most likely tokens (0 = off)
  /max_tokens <n>       longest reply in tokens
  /quit, /exit          leave (Ctrl-D works too; Ctrl-C stops a reply, or leaves at the prompt)"""


def _bad_char(text: str, index: int) -> str:
    point = ord(text[index])
    if 0xDC80 <= point <= 0xDCFF:  # surrogateescape: how Python keeps an undecodable byte (argv, some stdin)
        return f"byte 0x{point - 0xDC00:02x} at character {index}"
    return f"a lone surrogate U+{point:04X} at character {index}"


def require_utf8(text: str, what: str = "the prompt", hint: str = UTF8_HINT) -> str:
    """text, or E116 where it holds a surrogate: bytes that were not UTF-8 (Python keeps them as surrogate escapes
    in sys.argv) or a lone "\\ud800" escape from JSON. The tokenizer cannot encode either (a bare TypeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError("E116", f"{what} is not valid UTF-8 text: {_bad_char(text, exc.start)}", hint) from None
    return text


class ChatSession:
    """A conversation with a loaded model: system prompt + alternating user/assistant messages."""

    def __init__(
        self, bundle: InferenceBundle, sampling: SamplingConfig | None = None, *, system_prompt: str | None = None
    ) -> None:
        self.bundle = bundle
        self.sampling = sampling or SamplingConfig()
        self.system_prompt = system_prompt or None
        self.history: list[Message] = []

    def reset(self) -> None:
        self.history.clear()

    def messages(self) -> list[Message]:
        """System message (if any) then the history."""
        system = [Message("system", self.system_prompt)] if self.system_prompt else []
        return system + self.history

    def prompt_ids(self, user_text: str) -> list[int]:
        """The conversation plus user_text, formatted by the tokenizer's chat template (a model's own, or ours).

        The whole conversation, however long: generate() gives the reply what the prompt leaves of the context, and
        cuts only a prompt that fills it (from the left, with a warning). Text that is not UTF-8 is E116.
        """
        require_utf8(user_text)
        if self.system_prompt:
            require_utf8(self.system_prompt, "the system prompt")
        return self.bundle.tokenizer.encode_prompt([*self.messages(), Message("user", user_text)])

    def reply(self, user_text: str, *, stream: Callable[[str], None] | None = None) -> str:
        """Generate the assistant's answer to user_text, append both turns to the history and return the answer.

        With stream, text is emitted as it is generated; the emitted pieces concatenate to the returned string.
        """
        tokenizer = self.bundle.tokenizer
        prompt = self.prompt_ids(user_text)
        streamer = _TextStreamer(tokenizer.decode, stream)
        ids = generate(self.bundle.model, prompt, self.sampling, stop_ids=tokenizer.stop_ids, on_token=streamer.push)
        text = streamer.finish(ids)
        self.history += [Message("user", user_text), Message("assistant", text)]
        return text


class _TextStreamer:
    """Decodes the growing id list and emits the new suffix, holding back a trailing incomplete UTF-8 character."""

    def __init__(self, decode: Callable[[list[int]], str], emit: Callable[[str], None] | None) -> None:
        self.decode = decode
        self.emit = emit
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        if self.emit is not None:
            self._flush(self.decode(self.ids).rstrip(REPLACEMENT_CHAR))

    def _flush(self, text: str) -> None:
        if self.emit is not None and len(text) > len(self.emitted) and text.startswith(self.emitted):
            self.emit(text[len(self.emitted) :])
            self.emitted = text

    def finish(self, ids: list[int]) -> str:
        """The final text; emits whatever was held back (e.g. a replacement char the model really produced)."""
        text = self.decode(ids)
        self._flush(text)
        return text


def one_shot(session: ChatSession, prompt: str, *, stream: Callable[[str], None] | None = None) -> str:
    """Answer a single prompt (with the session's system prompt) without keeping it in the history."""
    saved = list(session.history)
    session.reset()
    try:
        return session.reply(prompt, stream=stream)
    finally:
        session.history = saved


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _model_of(bundle: InferenceBundle) -> str:
    source = bundle.config.model_source
    return f"model from {source}" if source else f"preset {bundle.config.preset}"


def banner(session: ChatSession) -> str:
    bundle, cfg = session.bundle, session.sampling
    counts = count_parameters(bundle.config.model)
    return (
        f"lumina-ds chat | {_model_of(bundle)} | {_human(counts.total)} parameters "
        f"({_human(counts.active)} active) | checkpoint {bundle.checkpoint_tag} ({bundle.run_dir})\n"
        f"temperature {cfg.temperature}, top_p {cfg.top_p}, top_k {cfg.top_k}, max_tokens {cfg.max_new_tokens}\n"
        f"Type a message; /help lists commands, /quit leaves."
    )


_SETTINGS: dict[str, tuple[str, Callable[[str], float | int]]] = {
    "/temperature": ("temperature", float),
    "/top_p": ("top_p", float),
    "/top_k": ("top_k", int),
    "/max_tokens": ("max_new_tokens", int),
}


def _set_sampling(session: ChatSession, command: str, arg: str) -> str:
    field, parse = _SETTINGS[command]
    try:
        change: dict[str, Any] = {field: parse(arg)}
        session.sampling = dataclasses.replace(session.sampling, **change)
    except ValueError:
        return f"{command} needs a number, got {arg!r}"
    except LuminaError as exc:
        return exc.message
    return f"{field} = {getattr(session.sampling, field)}"


def handle_command(session: ChatSession, line: str) -> str | None:
    """Run one /command; -> the text to show, or None to quit."""
    command, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if command in ("/quit", "/exit"):
        return None
    if command == "/help":
        return HELP
    if command == "/reset":
        session.reset()
        return "conversation cleared"
    if command == "/system":
        try:
            session.system_prompt = require_utf8(arg, "the system prompt") or None
        except LuminaError as exc:
            return f"error: {exc}"
        return f"system prompt set: {arg}" if arg else "system prompt removed"
    if command in _SETTINGS:
        return _set_sampling(session, command, arg)
    return f"unknown command {command}; /help lists commands"


def _answer(session: ChatSession, line: str, output: TextIO) -> None:
    # the prefix waits for the first piece, so a warning about the prompt (stderr) comes before it, not inside it
    started = False

    def emit(piece: str) -> None:
        nonlocal started
        output.write(piece if started else "assistant> " + piece)
        output.flush()
        started = True

    try:
        session.reply(line, stream=emit)
    except KeyboardInterrupt:
        emit(" [interrupted]")
    except LuminaError as exc:
        output.write(f"error: {exc}\n")
        return
    emit("")
    output.write("\n")


def _read_line(input_fn: Callable[[str], str], output: TextIO) -> str | None:
    """The next line ("" to skip one that is not UTF-8, after saying so); None at EOF or Ctrl-C."""
    try:
        return input_fn("you> ")
    except (EOFError, KeyboardInterrupt):
        print(file=output)
        return None
    except UnicodeDecodeError as exc:  # a strict UTF-8 stdin: the bytes never became a str
        bad = f"byte 0x{exc.object[exc.start]:02x}"
        error = DataError("E116", f"the line typed is not valid UTF-8 text: {bad}", UTF8_HINT)
        print(f"error: {error}", file=output)
        return ""


def run_repl(session: ChatSession, *, input_fn: Callable[[str], str] = input, output: TextIO = sys.stdout) -> None:
    """Interactive chat until /quit, /exit, EOF (Ctrl-D) or Ctrl-C at the prompt."""
    print(banner(session), file=output)
    while True:
        line = _read_line(input_fn, output)
        if line is None:
            break
        if not line.strip():
            continue
        if line.startswith("/"):
            shown = handle_command(session, line)
            if shown is None:
                break
            print(shown, file=output)
            continue
        _answer(session, line, output)
    print("bye", file=output)
