"""A model's chat template renders as transformers renders it, inside jinja2's immutable sandbox."""

from __future__ import annotations

import pytest

from lumina_ds.errors import DataError
from lumina_ds.tokenizer.chat_format import Message
from lumina_ds.tokenizer.jinja import JinjaChatTemplate, SandboxError
from tests.data.hf_templates import GEMMA2, LLAMA3, MISTRAL, QWEN25

MESSAGES = [Message("system", "Be brief."), Message("user", "  Hi <b>&</b> ü"), Message("assistant", "Hello!\n")]
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>"}
# tojson without HTML escaping, namespace, loop controls and dict(), as transformers' environment provides them
FEATURES = (
    "{% set ns = namespace(count=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
    "{% set ns.count = ns.count + 1 %}{{ m | tojson }}{% endfor %}{{ ns.count }}{{ dict(a=1) | tojson }}"
    "{{ strftime_now('%Y') | length }}{% if add_generation_prompt %}<gen>{% endif %}"
)


@pytest.mark.parametrize("source", [QWEN25, LLAMA3, MISTRAL, FEATURES])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_renders_as_transformers(source: str, add_generation_prompt: bool) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    chat = [{"role": m.role, "content": m.content} for m in MESSAGES]
    expected, _ = render_jinja_template(
        [chat], chat_template=source, add_generation_prompt=add_generation_prompt, **SPECIALS
    )
    template = JinjaChatTemplate(source, special_tokens=SPECIALS)
    assert template.render(MESSAGES, add_generation_prompt=add_generation_prompt) == expected[0]


def test_features_render_to_the_hand_written_text() -> None:
    text = JinjaChatTemplate(FEATURES).render(MESSAGES, add_generation_prompt=True)
    assert text == (
        '{"role": "user", "content": "  Hi <b>&</b> ü"}{"role": "assistant", "content": "Hello!\\n"}2{"a": 1}4<gen>'
    )


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ lipsum.__globals__['os'] }}",
        "{{ self.__init__ }}",
        "{{ messages | attr('__class__') }}",
        "{{ (messages | first).__class__.__base__ }}",
        "{% set ns = namespace(_secret=1) %}",
    ],
)
def test_the_sandbox_refuses_python_internals(source: str) -> None:
    with pytest.raises(SandboxError, match="refused by the sandbox") as err:
        JinjaChatTemplate(source).render(MESSAGES)
    assert err.value.code == "E120"


@pytest.mark.parametrize(
    "source",
    [
        "{% set _ = messages.append({'role': 'user', 'content': 'injected'}) %}",
        "{% set _ = messages.pop() %}",
        "{{ messages[0].update({'content': 'changed'}) }}",
        "{{ messages.clear() }}",
    ],
)
def test_the_sandbox_refuses_to_change_the_inputs(source: str) -> None:
    messages = list(MESSAGES)
    with pytest.raises(SandboxError, match="access to attribute") as err:
        JinjaChatTemplate(source).render(messages)
    assert err.value.code == "E120"
    assert messages == MESSAGES


def test_raise_exception_and_template_errors_are_e120_not_sandbox_errors() -> None:
    with pytest.raises(DataError, match="System role not supported") as err:
        JinjaChatTemplate(GEMMA2, special_tokens={"bos_token": "<bos>"}).render(MESSAGES)
    assert err.value.code == "E120" and not isinstance(err.value, SandboxError)
    with pytest.raises(DataError, match="does not compile") as err:
        JinjaChatTemplate("{% for m in messages %}")
    assert err.value.code == "E120"


def test_generation_spans_are_tracked_in_characters() -> None:
    source = "{% for m in messages %}[{{ m.role }}]{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    text, spans = JinjaChatTemplate(source).render_tracked(MESSAGES[1:])
    assert text == "[user]  Hi <b>&</b> ü[assistant]Hello!\n"
    assert spans == [(6, 21), (32, 39)]
    assert JinjaChatTemplate(source).render(MESSAGES[1:]) == text  # markers only while tracking
