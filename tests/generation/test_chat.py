"""ChatSession, streaming, one-shot prompts and the scripted REPL."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lumina_ds.generation import ChatSession, SamplingConfig, load_for_inference, one_shot, run_repl
from lumina_ds.models.transformer import Transformer
from lumina_ds.tokenizer import ChatTemplate, ChatTokenizer, Message
from tests.generation.conftest import scripted_bundle

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=64)


def _inputs(lines: list[str], end: type[BaseException] = EOFError) -> Callable[[str], str]:
    it: Iterator[str] = iter(lines)

    def input_fn(prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise end from None

    return input_fn


def test_reply_builds_prompt_with_system_first_and_records_history(tokenizer: ChatTokenizer) -> None:
    bundle, _ = scripted_bundle(tokenizer, ["Hi!", "Fine."])
    session = ChatSession(bundle, GREEDY, system_prompt="Be brief.")
    assert session.reply("hello") == "Hi!"
    assert session.reply("how are you?") == "Fine."
    expected = [Message("system", "Be brief."), Message("user", "hello"), Message("assistant", "Hi!"),
                Message("user", "how are you?"), Message("assistant", "Fine.")]  # fmt: skip
    assert session.messages() == expected
    assert session.prompt_ids("next") == ChatTemplate().encode_prompt([*expected, Message("user", "next")], tokenizer)


def test_streaming_does_not_split_multibyte_characters(tokenizer: ChatTokenizer) -> None:
    text = "sun ☀ and ünïcode 日本"
    assert len(tokenizer.encode("☀")) > 1  # the tokenizer never saw it: one byte token per UTF-8 byte
    bundle, _ = scripted_bundle(tokenizer, [text])
    pieces: list[str] = []
    reply = ChatSession(bundle, GREEDY).reply("hi", stream=pieces.append)
    assert reply == text
    assert "".join(pieces) == reply
    assert not any("\ufffd" in p for p in pieces)
    assert len(pieces) > 5


def test_streaming_with_real_model_concatenates_to_reply(run_dir: tuple[Path, Transformer]) -> None:
    session = ChatSession(load_for_inference(run_dir[0]), SamplingConfig(max_new_tokens=20, seed=3))
    pieces: list[str] = []
    reply = session.reply("hello there", stream=pieces.append)
    assert "".join(pieces) == reply
    assert session.history[-1] == Message("assistant", reply)
    again = ChatSession(session.bundle, session.sampling).reply("hello there")
    assert again == reply  # same seed, same prompt -> same reply


def test_one_shot_leaves_history_alone(tokenizer: ChatTokenizer) -> None:
    bundle, _ = scripted_bundle(tokenizer, ["A", "B"])
    session = ChatSession(bundle, GREEDY)
    session.reply("first")
    assert one_shot(session, "second") == "B"
    assert [m.content for m in session.history] == ["first", "A"]


def test_repl_script(tokenizer: ChatTokenizer) -> None:
    bundle, _ = scripted_bundle(tokenizer, ["Hello, friend!", "Again."])
    session = ChatSession(bundle, SamplingConfig(temperature=0.7, max_new_tokens=64))
    out = io.StringIO()
    history_seen: list[int] = []

    def input_fn(prompt: str) -> str:
        history_seen.append(len(session.history))
        return script.pop(0)

    script = ["hello", "/temperature 0", "/reset", "again", "/quit", "never read"]
    run_repl(session, input_fn=input_fn, output=out)
    text = out.getvalue()
    assert text.startswith("lumina-ds chat | preset debug |")
    assert "checkpoint step_00000010" in text
    assert "assistant> Hello, friend!\n" in text
    assert "temperature = 0.0" in text and session.sampling.temperature == 0.0
    assert "conversation cleared" in text
    assert "assistant> Again.\n" in text
    assert history_seen == [0, 2, 2, 0, 2]  # /reset emptied the history before "again"
    assert script == ["never read"]
    assert text.rstrip().endswith("bye")


@pytest.mark.parametrize("end", [EOFError, KeyboardInterrupt])
def test_repl_exits_cleanly_on_eof_and_ctrl_c(tokenizer: ChatTokenizer, end: type[BaseException]) -> None:
    bundle, _ = scripted_bundle(tokenizer, ["ok"])
    out = io.StringIO()
    run_repl(ChatSession(bundle, GREEDY), input_fn=_inputs(["hi"], end), output=out)
    assert "assistant> ok\n" in out.getvalue()
    assert out.getvalue().rstrip().endswith("bye")


def test_repl_settings_and_errors(tokenizer: ChatTokenizer) -> None:
    bundle, _ = scripted_bundle(tokenizer, ["ok"])
    session = ChatSession(bundle, GREEDY)
    lines = ["/top_p 0.5", "/top_k 7", "/max_tokens 12", "/temperature -1", "/top_k lots", "/system Be nice.",
             "/help", "/frobnicate", "   ", "/exit"]  # fmt: skip
    out = io.StringIO()
    run_repl(session, input_fn=_inputs(lines), output=out)
    cfg = session.sampling
    assert (cfg.top_p, cfg.top_k, cfg.max_new_tokens, cfg.temperature) == (0.5, 7, 12, 0.0)
    assert session.system_prompt == "Be nice."
    text = out.getvalue()
    assert "temperature=-1.0 must be >= 0" in text
    assert "/top_k needs a number, got 'lots'" in text
    assert "/max_tokens <n>" in text  # help
    assert "unknown command /frobnicate" in text


def test_ctrl_c_during_reply_stops_it_but_not_the_repl(tokenizer: ChatTokenizer) -> None:
    bundle, _ = scripted_bundle(tokenizer, ["ok"])
    session = ChatSession(bundle, GREEDY)

    def interrupted(user_text: str, *, stream: Callable[[str], None] | None = None) -> str:
        raise KeyboardInterrupt

    session.reply = interrupted  # type: ignore[method-assign]
    out = io.StringIO()
    run_repl(session, input_fn=_inputs(["hi", "/quit"]), output=out)
    assert "assistant>  [interrupted]\n" in out.getvalue()
    assert out.getvalue().rstrip().endswith("bye")
