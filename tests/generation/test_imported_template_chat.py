"""Chat with a run whose tokenizer carries a model's own chat template: prompts are formatted by that template and
generation stops at its end-of-turn or EOS token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lumina_ds.cli import main
from lumina_ds.config import RunConfig
from lumina_ds.generation import ChatSession, InferenceBundle, SamplingConfig, load_for_inference
from lumina_ds.tokenizer import ChatTokenizer
from lumina_ds.tokenizer.jinja import JinjaChatTemplate
from tests.data.hf_templates import CHATML_SPECIALS, QWEN25, TEXTS, family_tokenizer
from tests.generation.conftest import ScriptedModel, make_run_dir, tiny_model_config

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=32)


@pytest.fixture(scope="module")
def chatml() -> ChatTokenizer:
    """Qwen2.5-Instruct as published: EOS <|im_end|>, and generation_config.json's eos ids add <|endoftext|>."""
    named = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    backend = family_tokenizer("qwen2", CHATML_SPECIALS, TEXTS)
    template = JinjaChatTemplate(QWEN25, special_tokens=named)
    stops = [backend.token_to_id("<|im_end|>"), backend.token_to_id("<|endoftext|>")]
    return ChatTokenizer(backend, chat_template=template, generation_stops=stops)


def _text_ids(tokenizer: ChatTokenizer, text: str) -> list[int]:
    """Rendered text as transformers tokenizes it (special-token strings are control tokens)."""
    assert tokenizer.codec is not None
    return list(tokenizer.codec.backend.encode(text, add_special_tokens=False).ids)


def test_a_run_with_an_imported_template_chats_with_it(chatml: ChatTokenizer, tmp_path: Path) -> None:
    run, _ = make_run_dir(tmp_path / "run", chatml)
    bundle = load_for_inference(run)
    assert bundle.tokenizer.chat_template == chatml.chat_template  # chat_template.jinja beside tokenizer.json
    assert json.loads((run / "generation_config.json").read_text()) == {"eos_token_id": [0, 2]}
    end, eos = chatml.token_id("<|im_end|>"), chatml.token_id("<|endoftext|>")
    assert bundle.tokenizer.stop_ids == {end, eos}
    # first reply ends at the end-of-turn token, the second at EOS; what follows a stop id is never produced
    script = [*chatml.encode("Hi there!"), end, *chatml.encode("Fine."), eos, *chatml.encode("never")]
    model = ScriptedModel(tiny_model_config(chatml.vocab_size, max_seq_len=4096), script)
    scripted = InferenceBundle(model, RunConfig(preset="debug"), bundle.tokenizer, "step_00000010", run)  # type: ignore[arg-type]
    session = ChatSession(scripted, GREEDY, system_prompt="Be brief.")
    assert session.reply("hello") == "Hi there!"
    assert session.reply("how are you?") == "Fine."
    assert session.prompt_ids("bye") == _text_ids(
        chatml,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
        "Hi there!<|im_end|>\n<|im_start|>user\nhow are you?<|im_end|>\n<|im_start|>assistant\nFine.<|im_end|>\n"
        "<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n",
    )


def test_chat_command_formats_the_prompt_with_the_runs_template(
    chatml: ChatTokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import lumina_ds.generation.chat as chat_module

    run, _ = make_run_dir(tmp_path / "run", chatml)
    seen: dict[str, object] = {}
    reply = chatml.encode("Hello!")

    def fake_generate(model: object, prompt: list[int], cfg: SamplingConfig, *, stop_ids: object, on_token: object):  # type: ignore[no-untyped-def]
        seen.update(prompt=prompt, stop_ids=stop_ids, temperature=cfg.temperature)
        return reply

    monkeypatch.setattr(chat_module, "generate", fake_generate)
    argv = ["chat", "--checkpoint", str(run), "--prompt", "hello", "--temperature", "0", "--device", "cpu"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().endswith("Hello!")
    default_system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    expected = (
        f"<|im_start|>system\n{default_system}<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    )
    assert seen == {
        "prompt": _text_ids(chatml, expected),
        "stop_ids": {chatml.token_id("<|im_end|>"), chatml.token_id("<|endoftext|>")},
        "temperature": 0.0,
    }
