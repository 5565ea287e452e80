"""The prompt and the reply share the model's context: the prompt is kept whole and the reply gets what it leaves;
only a prompt that fills the context is cut (its end stays, with a warning). A prompt that is not UTF-8 is E116."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lumina_ds.config.io import load_config
from lumina_ds.errors import DataError
from lumina_ds.generation import ChatSession, SamplingConfig, generate, generate_batch, run_repl
from lumina_ds.generation.check import read_prompts
from lumina_ds.models.transformer import Transformer
from lumina_ds.tokenizer import ChatTokenizer, Message
from tests.generation.conftest import ScriptedModel, scripted_bundle, tiny_model_config
from tests.runs import here

CONTEXT = 96  # tiny_model_config's max_seq_len
ROOM = CONTEXT // 8  # what a cut leaves for the reply (docs/chat.md)
QUESTION = "Explain RoPE briefly."


def _scripted(tokenizer: ChatTokenizer) -> tuple[ChatSession, ScriptedModel]:
    """A session whose model answers "hello" forever (never END): every reply runs to its budget."""
    bundle, _ = scripted_bundle(tokenizer, [])
    model = ScriptedModel(tiny_model_config(tokenizer.vocab_size), script=tokenizer.encode("hello")[:1])
    bundle.model = model  # type: ignore[assignment]
    bundle.config.model = model.config
    return ChatSession(bundle, SamplingConfig(temperature=0.0, max_new_tokens=256)), model


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


@pytest.mark.parametrize("max_tokens", [CONTEXT, 256])
def test_with_max_tokens_at_the_context_the_whole_prompt_reaches_the_model(
    tokenizer: ChatTokenizer, max_tokens: int, capsys: pytest.CaptureFixture[str]
) -> None:
    session, model = _scripted(tokenizer)
    expected = tokenizer.encode_prompt([Message("user", QUESTION)])
    assert 10 < len(expected) < CONTEXT  # a real prompt: far more than the one token the old cut kept
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=max_tokens)
    reply = generate(model, session.prompt_ids(QUESTION), cfg, stop_ids=tokenizer.stop_ids)  # type: ignore[arg-type]
    assert model.inputs[0] == expected  # the prefill
    assert len(reply) == CONTEXT - len(expected)  # the reply budget is what the prompt leaves
    assert _warnings(capsys.readouterr().err) == []


def test_a_chat_turn_feeds_the_whole_conversation(tokenizer: ChatTokenizer) -> None:
    session, model = _scripted(tokenizer)
    session.system_prompt = "Be brief."
    session.sampling.max_new_tokens = 5
    session.reply("hi")
    session.sampling.max_new_tokens = 256
    model.inputs.clear()
    session.reply(QUESTION)
    history = [Message("system", "Be brief."), *session.history[:2], Message("user", QUESTION)]
    assert model.inputs[0] == tokenizer.encode_prompt(history)
    assert len(model.inputs) == CONTEXT - len(model.inputs[0])  # prefill + budget - 1 steps (the last is not fed)


def test_a_prompt_longer_than_the_context_keeps_its_end_and_warns_once(
    tokenizer: ChatTokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    session, model = _scripted(tokenizer)
    long_text = " ".join(f"word{i}" for i in range(60))
    full = tokenizer.encode_prompt([Message("user", long_text)])
    assert len(full) > CONTEXT
    session.reply(long_text)
    assert model.inputs[0] == full[-(CONTEXT - ROOM) :]  # the end, nearest the reply, stays
    assert len(model.inputs) == ROOM  # a reply of ROOM tokens: the prefill and ROOM - 1 steps
    (warning,) = _warnings(capsys.readouterr().err)
    assert f"({len(full)} tokens)" in warning and f"context of {CONTEXT} tokens" in warning
    assert f"dropped its first {len(full) - (CONTEXT - ROOM)} tokens" in warning


def test_a_prompt_that_fills_the_context_says_so(tokenizer: ChatTokenizer, capsys: pytest.CaptureFixture[str]) -> None:
    _, model = _scripted(tokenizer)
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=256)
    reply = generate(model, list(range(1, CONTEXT + 1)), cfg, stop_ids=())  # type: ignore[arg-type]
    assert model.inputs[0] == list(range(ROOM + 1, CONTEXT + 1))
    assert len(reply) == ROOM
    (warning,) = _warnings(capsys.readouterr().err)
    assert f"fills the whole model's context of {CONTEXT} tokens" in warning
    assert f"dropped its first {ROOM} tokens" in warning


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_batched_rows_each_get_what_their_prompt_leaves(one_thread: None, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(64, attention_backend="sdpa")).eval()
    prompts = [[1 + i % 63 for i in range(n)] for n in (10, 60, 130)]
    prefills: list[list[int]] = []
    hook = model.embed.register_forward_hook(
        lambda _m, args, _o: prefills.append(args[0].tolist()) if not prefills else None
    )
    try:
        replies = generate_batch(model, prompts, SamplingConfig(temperature=0.0, max_new_tokens=256), stop_ids=())
    finally:
        hook.remove()
    assert [len(r) for r in replies] == [CONTEXT - 10, CONTEXT - 60, ROOM]
    assert prefills[0][0][-10:] == prompts[0] and prefills[0][1][-60:] == prompts[1]
    assert prefills[0][2] == prompts[2][-(CONTEXT - ROOM) :]
    (warning,) = _warnings(capsys.readouterr().err)
    assert warning.startswith("warning: prompt 3 of 3: ") and f"dropped its first {130 - CONTEXT + ROOM}" in warning


def _record_forwards(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Row 0 of the input ids of every Transformer forward from now on ([0]: the prefilled prompt)."""
    calls: list[list[int]] = []
    original = Transformer.forward

    def forward(self: Transformer, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(input_ids[0].tolist())
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(Transformer, "forward", forward)
    return calls


def test_chat_command_feeds_the_whole_prompt_with_max_tokens_above_the_context(
    run_dir: tuple[Path, Transformer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = ChatTokenizer.from_file(run_dir[0] / "tokenizer.json").encode_prompt([Message("user", QUESTION)])
    calls = _record_forwards(monkeypatch)
    argv = ["chat", "--checkpoint", str(run_dir[0]), "--prompt", QUESTION, "--temperature", "0", "--max-tokens", "256"]
    done = here(argv, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert calls[0] == expected and len(expected) > 10
    assert len(calls) <= CONTEXT - len(expected)  # the prefill and at most budget - 1 steps
    assert _warnings(done.stderr) == []


def test_debug_preset_chat_with_default_max_tokens_hears_the_whole_prompt(
    shared_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the issue: the default --max-tokens (256) is the debug preset's whole context, which cut the prompt to 1 token
    question = "What is 47 + 32?"
    assert load_config(shared_run / "config.yaml").model.max_seq_len == 256
    expected = ChatTokenizer.from_file(shared_run / "tokenizer.json").encode_prompt([Message("user", question)])
    calls = _record_forwards(monkeypatch)
    done = here(["chat", "--checkpoint", str(shared_run), "--prompt", question, "--temperature", "0"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert calls[0] == expected and len(expected) > 5
    assert len(calls) <= 256 - len(expected)
    assert _warnings(done.stderr) == []


# ---- prompts that are not UTF-8 ----------------------------------------------------------------------------------
BAD = "\udcff\udcfe"  # what Python makes of the bytes ff fe in sys.argv (surrogateescape)


def _assert_e116(stderr: str) -> None:
    assert stderr.startswith("error: [E116] ") and "\nHint: " in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("flags", [["--prompt", BAD], ["--prompt", "hi", "--system-prompt", f"Be {BAD}"]])
def test_chat_with_a_prompt_that_is_not_utf8_is_e116(
    run_dir: tuple[Path, Transformer], tmp_path: Path, flags: list[str]
) -> None:
    done = here(["chat", "--checkpoint", str(run_dir[0]), *flags, "--temperature", "0"], cwd=tmp_path)
    assert done.returncode == 1
    _assert_e116(done.stderr)
    assert "byte 0xff" in done.stderr


@pytest.mark.parametrize(
    ("content", "where"),
    [(b"hello there\n\xff\xfe bad\n", ":2: "), (json.dumps({"prompt": "a \ud800 b"}).encode() + b"\n", ":1: ")],
    ids=["bytes", "json-surrogate-escape"],
)
def test_generate_check_with_a_prompt_that_is_not_utf8_is_e116(
    run_dir: tuple[Path, Transformer], tmp_path: Path, content: bytes, where: str
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    with pytest.raises(DataError) as err:
        read_prompts(prompts)
    assert err.value.code == "E116" and where in err.value.message
    done = here(["generate-check", "--checkpoint", str(run_dir[0]), "--prompts", str(prompts)], cwd=tmp_path)
    assert done.returncode == 1
    _assert_e116(done.stderr)


def test_session_reply_to_bad_utf8_is_e116_not_a_type_error(tokenizer: ChatTokenizer) -> None:
    session, _ = _scripted(tokenizer)
    with pytest.raises(DataError) as err:
        session.reply(f"hi {BAD}")
    assert err.value.code == "E116" and "byte 0xff at character 3" in err.value.message
    assert session.history == []


def _lines(items: list[Any]) -> Callable[[str], str]:
    it = iter(items)

    def input_fn(prompt: str) -> str:
        item = next(it, EOFError())
        if isinstance(item, BaseException):
            raise item
        return str(item)

    return input_fn


def test_repl_says_e116_for_a_bad_line_and_goes_on(tokenizer: ChatTokenizer) -> None:
    bundle, _ = scripted_bundle(tokenizer, ["ok"])
    session = ChatSession(bundle, SamplingConfig(temperature=0.0, max_new_tokens=8))
    undecodable = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")  # strict stdin
    out = io.StringIO()
    run_repl(session, input_fn=_lines([undecodable, BAD, f"/system {BAD}", "hi"]), output=out)
    text = out.getvalue()
    assert text.count("error: [E116] ") == 3 and text.count("Hint: ") == 3
    assert "assistant> ok\n" in text
    assert session.system_prompt is None
    assert session.history == [Message("user", "hi"), Message("assistant", "ok")]
