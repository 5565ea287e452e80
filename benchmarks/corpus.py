"""A chat corpus of any size from the bundled conversations: each copy's user turns carry a counter, so no line
repeats (a repeated line would let caches and deduplication flatter a measurement). Imports nothing of lumina-ds, so
a benchmark that runs another checkout can use it."""

from __future__ import annotations

import json
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "conversations.jsonl"


def write_conversations(path: Path, size_mb: float, *, label: str = "") -> Path:
    """`path` filled with copies of the bundled conversations until `size_mb`, each first turn prefixed
    `[<label><copy>]`."""
    lines = [json.loads(line) for line in EXAMPLES.read_text().splitlines()]
    target, written, copy = int(size_mb * 1e6), 0, 0
    with path.open("w") as handle:
        while written < target:
            for conversation in lines:
                messages = [dict(m) for m in conversation["messages"]]
                messages[0]["content"] = f"[{label}{copy}] {messages[0]['content']}"
                line = json.dumps({"messages": messages}) + "\n"
                handle.write(line)
                written += len(line)
            copy += 1
    return path
