"""Published chat templates of model families (as their tokenizer_config.json / chat_template.jinja ship them) and
tiny tokenizers with each family's special tokens and pre-tokenizer, for the chat-template tests."""

# ruff: noqa: E501  (templates are quoted verbatim, as they ship)

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from lumina_ds.tokenizer.chat_tokenizer import ChatTokenizer
from lumina_ds.tokenizer.jinja import JinjaChatTemplate

# Qwen2.5-Instruct (ChatML, with its tool-use branches and default system prompt)
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Meta-Llama-3-8B-Instruct
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Mistral-7B-Instruct-v0.1 / Mixtral-8x7B-Instruct-v0.1 (a system message joins the first user turn)
MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# Mistral-7B-Instruct-v0.3 style: the system message joins the *last* user turn, so earlier turns render differently
# once the conversation grows (not prefix-stable with a system message).
MISTRAL_V3 = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"] + eos_token}}
    {%- endif %}
{%- endfor %}
"""

# Gemma-2-it: no system role (raise_exception), assistant turns are "model", contents trimmed
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

# ChatML with {% generation %} markers (as SmolLM3/OLMo-2-style templates ship them) and a header that counts the
# turns, so the rendering of earlier turns changes as the conversation grows: only the markers give exact spans.
CHATML_GENERATION = """{{- '<|im_start|>system\nA chat of ' + (messages | length) | string + ' messages.<|im_end|>\n' }}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {{- '<|im_start|>system\n' + message.content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}{{- message.content + '<|im_end|>' }}{%- endgeneration %}
        {{- '\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""

# Qwen3's behaviour in a few lines (written for these tests): a reply after the last user message renders a think
# block, empty unless the content holds one; earlier replies render without it. So a conversation's first reply
# renders differently once the conversation goes on: not prefix-stable.
QWEN3_STYLE = """{%- for message in messages %}
    {%- if message.role == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- set answer = message.content.split('</think>')[-1].lstrip('\n') %}
        {%- if loop.last %}
            {%- set thought = message.content.split('</think>')[0].split('<think>')[-1] if '</think>' in message.content else '' %}
            {{- '<think>\n' + thought.strip('\n') + '\n</think>\n\n' }}
        {%- endif %}
        {{- answer + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""

_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def family_tokenizer(kind: str, specials: list[str], texts: Iterable[str], *, vocab_size: int = 600) -> Tokenizer:
    """A BPE with the family's normalizer and pre-tokenizer (GPT-2 byte level, Qwen2's NFC + split + byte level as
    transformers' Qwen2Tokenizer builds it, Llama-3's split + byte level, or SentencePiece-like metaspace) and
    special tokens, trained on texts."""
    tokenizer = Tokenizer(models.BPE())
    if kind == "metaspace":
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet: list[str] = []
    else:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind == "bytelevel")
        split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT if kind == "qwen2" else _LLAMA3_SPLIT), behavior="isolated")
        tokenizer.pre_tokenizer = byte_level if kind == "bytelevel" else pre_tokenizers.Sequence([split, byte_level])
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    if kind == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# family: (template, pre-tokenizer kind, special tokens of the vocabulary, tokenizer_config.json's named tokens)
FAMILIES: dict[str, tuple[str, str, list[str], dict[str, str]]] = {
    "chatml": (QWEN25, "qwen2", CHATML_SPECIALS, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "llama3": (
        LLAMA3,
        "llama3",
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    ),
    "mistral": (MISTRAL, "metaspace", ["<unk>", "<s>", "</s>"], {"bos_token": "<s>", "eos_token": "</s>"}),
    "mistral_v3": (MISTRAL_V3, "metaspace", ["<unk>", "<s>", "</s>"], {"bos_token": "<s>", "eos_token": "</s>"}),
    "gemma2": (
        GEMMA2,
        "metaspace",
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
    ),
    "qwen3_style": (QWEN3_STYLE, "qwen2", CHATML_SPECIALS, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "chatml_generation": (CHATML_GENERATION, "bytelevel", CHATML_SPECIALS, {"eos_token": "<|endoftext|>"}),
}
TEXTS = [
    "Hello there, how are you today?",
    "I am fine.\n\nThanks for asking!",
    "Be brief and kind.",
    "ünïcödé 日本語 🙂 and emoji",
    "  leading spaces and\ttabs",
    "\n\nnewlines first, then words",
    "What is 2 + 2? It is 4.",
] * 10


def family_chat_tokenizer(family: str) -> ChatTokenizer:
    """A ChatTokenizer with the family's published chat template and a tiny vocabulary in its style."""
    template, kind, specials, named = FAMILIES[family]
    backend = family_tokenizer(kind, specials, TEXTS)
    return ChatTokenizer(backend, chat_template=JinjaChatTemplate(template, special_tokens=named))
