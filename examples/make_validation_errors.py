"""Generate examples/validation_errors.jsonl: one line per validation kind: `python examples/make_validation_errors.py`.

tests/data/test_validate.py expects these exact line numbers; append new cases at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
LONG_ANSWER = " ".join(["Experts specialise while the router learns which tokens each one should see."] * 30)


def _chat(*turns: tuple[str, object]) -> bytes:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}, ensure_ascii=False).encode()


# (line bytes, kind it demonstrates; "" for a clean line)
LINES: list[tuple[bytes, str]] = [
    (_chat(("system", "Be brief."), ("user", "What is MoE?"), ("assistant", "Routing to experts.")), ""),  # 1
    (b'{"messages": [', "invalid_json"),  # 2
    (b"[1, 2, 3]", "not_object"),  # 3
    (b'{"conversation": []}', "missing_messages"),  # 4
    (b'{"messages": "hello"}', "messages_not_list"),  # 5
    (b'{"messages": []}', "empty_messages"),  # 6
    (b'{"messages": ["hello"]}', "message_not_object"),  # 7
    (b'{"messages": [{"content": "Hi"}, {"role": "assistant", "content": "Hello"}]}', "missing_role"),  # 8
    (b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}', "missing_content"),  # 9
    (_chat(("user", 42), ("assistant", "Hello")), "wrong_type"),  # 10
    (_chat(("wizard", "Hi"), ("assistant", "Hello")), "unknown_role"),  # 11
    (_chat(("user", "Hi"), ("assistant", "Hello"), ("assistant", "Hello again")), "role_order"),  # 12
    (_chat(("user", "Hi"), ("user", "Anyone?"), ("assistant", "Yes")), "role_order"),  # 13
    (_chat(("user", "Hi"), ("assistant", "Hello"), ("user", "Bye")), "role_order"),  # 14
    (_chat(("user", "Hi"), ("system", "Be kind."), ("assistant", "Hello")), "role_order"),  # 15
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}', "invalid_utf8"),
    (_chat(("user", "caf\ufffd?"), ("assistant", "Coffee.")), "replacement_char"),  # 17
    (_chat(("user", "Ring the bell\u0007"), ("assistant", "Ding.")), "control_char"),  # 18
    (_chat(("user", "Say something."), ("assistant", "")), "no_assistant_content"),  # 19
    (b"", ""),  # 20 blank
    (_chat(("user", "What is top-p?"), ("assistant", "Sampling from the smallest likely set.")), ""),  # 21
    (_chat(("system", ""), ("user", "What is RoPE?"), ("assistant", "Rotary positions.")), "empty_content"),  # 22
    (_chat(("system", "Be brief."), ("user", "What is MoE?"), ("assistant", "Routing to experts.")), "duplicate"),
    (_chat(("human", "What is ZeRO?"), ("gpt", "Sharded training state.")), "role_alias"),  # 24
    (_chat(("user", "  What is warmup?"), ("assistant", "A slow start.\n")), "whitespace"),  # 25
    (_chat(("user", "Tell me about experts."), ("assistant", LONG_ANSWER)), "too_long"),  # 26
    (_chat(("user", "Hi"), ("assistant", ""), ("user", "Hello?"), ("assistant", "Hi!")), "role_order"),  # 27
    (b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "?"}]}', "invalid_utf8"),
    (_chat(("user", "Answer with a NUL."), ("assistant", "\u0000")), "control_char"),  # 29: repair leaves it empty
]


def main() -> None:
    """Write validation_errors.jsonl next to this script."""
    (HERE / "validation_errors.jsonl").write_bytes(b"".join(line + b"\n" for line, _ in LINES))


if __name__ == "__main__":
    main()
