"""Lines longer than --max-line-bytes: skipped with their line number (E111) without being read into memory, or cut
with --truncate-long into a valid conversation that fits (W106); validation and every training reader agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lumina_ds.cli import main
from lumina_ds.data.prepare.documents import DocEncoder, JsonlDocs
from lumina_ds.data.prepare.tokenize import EncodeSettings, tokenize_source
from lumina_ds.data.records.checks import LineLimit, check_line
from lumina_ds.data.records.types import SkippedLine
from lumina_ds.data.validate.validator import validate_files
from lumina_ds.tokenizer import ChatTokenizer
from tests.helpers import read_conversations

LIMIT = 4096
GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
OTHER = {"messages": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye!"}]}


def _line(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _long(system: int, assistant: int) -> dict:
    """A conversation with a short user turn and long system/assistant contents holding characters JSON escapes."""
    return {
        "messages": [
            {"role": "system", "content": ('Be "brief".\n' * system)[:system]},
            {"role": "user", "content": "Summarise the thread."},
            {"role": "assistant", "content": ("é\t" + "a" * 40 + "\\\n") [: 44] * (assistant // 44 + 1)},
        ]
    }  # fmt: skip


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """Line 2 and line 5 are longer than LIMIT; line 4 is exactly LIMIT bytes long; line 6 has no newline."""
    padded = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "x"}]}
    padded["messages"][1]["content"] = "x" * (LIMIT - len(_line(padded)) + 2)
    path = tmp_path / "long.jsonl"
    lines = [_line(GOOD), _line(_long(9000, 20_000)), "\n", _line(padded), _line(_long(10, 6000)), _line(OTHER).strip()]
    path.write_text("".join(lines), encoding="utf-8")
    assert len(lines[3].encode()) == LIMIT + 1
    return path


def _skipped_by_training(path: Path, limit: LineLimit, tokenizer: ChatTokenizer) -> list[dict[int, str]]:
    """Skipped lines (number -> code) as the reader, the tokenizer (memory/sharded) and streaming see them."""
    read = {s.line_no: s.code for s in read_conversations(path, limit=limit).skipped}
    settings = EncodeSettings.of(tokenizer, max_line_bytes=limit.max_bytes, truncate_long=limit.truncate)
    tokenized = {s.line_no: s.code for s in tokenize_source(path, settings)[1].skipped_examples}
    docs = JsonlDocs(path, DocEncoder(tokenizer, limit=limit))
    streamed = {s.line_no: s.code for s in docs.fetch(range(len(docs))) if isinstance(s, SkippedLine)}
    return [read, tokenized, streamed]


def test_long_lines_are_errors_with_their_line_numbers(
    data: Path, tokenizer: ChatTokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate-data", str(data), "--max-line-bytes", str(LIMIT)]) == 1
    out = capsys.readouterr().out
    assert "E111 line_too_long                2  longer than --max-line-bytes; lines 2, 5" in out
    validator = validate_files([data], limit=LineLimit(LIMIT))
    errors = {i["line"]: i["code"] for i in validator.report()["issues"] if i["severity"] == "error"}
    assert errors == {2: "E111", 5: "E111"}
    size = len(data.read_bytes().splitlines()[1])
    assert f"line is {size:,} bytes, longer than --max-line-bytes {LIMIT:,}" in validator.issues[0]["reason"]
    assert _skipped_by_training(data, LineLimit(LIMIT), tokenizer) == [errors] * 3  # training skips exactly those
    assert main(["validate-data", str(data), "--quiet"]) == 0  # the default limit (4 MiB) keeps every line
    fixed, rejects = data.with_name("fixed.jsonl"), data.with_name("rejects.jsonl")
    argv = ["validate-data", str(data), "--max-line-bytes", str(LIMIT), "--fix-errors", "--output", str(fixed)]
    assert main([*argv, "--rejects", str(rejects)]) == 1
    rejected = [json.loads(line) for line in rejects.open(encoding="utf-8")]
    assert [(r["line"], r["code"]) for r in rejected] == [(2, "E111"), (5, "E111")]
    head = data.read_bytes().splitlines()[1][:200].decode()  # what identifies the line: its start and its size
    assert rejected[0]["raw"] == f"{head}... ({size:,} bytes)"


def test_truncate_long_cuts_contents_into_a_valid_conversation_that_fits(
    data: Path, tokenizer: ChatTokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fixed = tmp_path / "fixed.jsonl"
    argv = ["validate-data", str(data), "--max-line-bytes", str(LIMIT), "--truncate-long"]
    assert main([*argv, "--fix-errors", "--output", str(fixed)]) == 0
    assert "W106 truncated_long               2" in capsys.readouterr().out
    written = fixed.read_text(encoding="utf-8").splitlines(keepends=True)
    original = data.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(written) == 5 and written[0] == original[0] and written[2] == original[3]  # short lines unchanged
    for cut, source in ((written[1], original[1]), (written[3], original[4])):
        assert LIMIT - 8 <= len(cut.encode()) - 1 <= LIMIT  # fills the limit, escapes counted
        kept, full = json.loads(cut)["messages"], json.loads(source)["messages"]
        assert [m["role"] for m in kept] == [m["role"] for m in full] == ["system", "user", "assistant"]
        assert all(f["content"].startswith(k["content"]) for k, f in zip(kept, full, strict=True))
    # line 2: both long contents are cut to one common length, the short user turn is whole
    kept = [m["content"] for m in json.loads(written[1])["messages"]]
    sizes = [len(json.dumps(content, ensure_ascii=False).encode()) for content in kept]  # as written in the line
    assert kept[1] == "Summarise the thread." and abs(sizes[0] - sizes[2]) <= 2
    # line 5: the 10-character system prompt is untouched, only the assistant turn is cut
    assert json.loads(written[3])["messages"][0]["content"] == 'Be "brief"'
    again = validate_files([fixed], limit=LineLimit(LIMIT)).report()  # no line of the fixed file is too long
    assert again["ok"] and again["valid"] == 5 and "truncated_long" not in again["warnings"]
    # training uses the same cut conversations: their tokens are those of the fixed file
    settings = EncodeSettings.of(tokenizer, max_line_bytes=LIMIT, truncate_long=True)
    lengths = tokenize_source(data, settings)[0].lengths.tolist()
    reference = tokenize_source(fixed, EncodeSettings.of(tokenizer, max_line_bytes=LIMIT))[0].lengths.tolist()
    assert [n for n in lengths if n] == [n for n in reference if n] and len(lengths) == 6
    assert _skipped_by_training(data, LineLimit(LIMIT, truncate=True), tokenizer) == [{}] * 3


def test_a_line_that_cannot_be_cut_to_fit_stays_an_error() -> None:
    turns = [{"role": ("user", "assistant")[i % 2], "content": "ok"} for i in range(400)]  # ~12 KB of structure
    checked = check_line(1, _line({"messages": turns}).encode(), LineLimit(LIMIT, truncate=True))
    assert checked is not None and checked.error is not None
    assert checked.error.code == "E111" and "its 400 messages cannot be cut to fit" in checked.error.reason


# The child measures its own peak RSS (VmHWM) around validate-data, or training's tokenizing, on one file.
_CHILD = """
import json, sys
from pathlib import Path
mode, path, tokenizer, limit, truncate = sys.argv[1:6]
if mode == "validate":
    from lumina_ds.cli import main
    flags = ["--tokenizer", tokenizer, "--max-line-bytes", limit, "--quiet"] + ["--truncate-long"] * (truncate == "1")
    main(["validate-data", path, *flags])
else:
    from lumina_ds.data.prepare.tokenize import EncodeSettings, tokenize_source
    from lumina_ds.tokenizer.chat_tokenizer import ChatTokenizer
    tok = ChatTokenizer.from_file(tokenizer)
    settings = EncodeSettings.of(tok, max_line_bytes=int(limit), truncate_long=truncate == "1")
    tokenize_source(Path(path), settings, num_workers=1)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(int(status["VmHWM"].split()[0]) * 1024)
"""
LINE_BYTES = 32 << 20
# HF tokenizers take ~180 bytes of RAM per byte they tokenize (measured): tokenized whole, this line would take ~6 GB.
TOKENIZE_BYTES_PER_BYTE = 250
READ_COPIES = 4  # a line cut with --truncate-long is held as bytes, text and JSON before it is cut


def _peak(mode: str, path: Path, tokenizer: Path, limit: int, *, truncate: bool) -> int:
    argv = [sys.executable, "-c", _CHILD, mode, str(path), str(tokenizer), str(limit), str(int(truncate))]
    proc = subprocess.run(argv, capture_output=True, text=True, check=True)
    return int(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["validate", "tokenize"])
def test_memory_is_bounded_by_the_limit_not_the_line(mode: str, tokenizer: ChatTokenizer, tmp_path: Path) -> None:
    small, big, tok = tmp_path / "small.jsonl", tmp_path / "big.jsonl", tmp_path / "tok.json"
    tokenizer.save(tok)
    small.write_text(_line(GOOD) * 20)
    text = ("the router scores every expert and keeps the top k. " * (LINE_BYTES // 50))[:LINE_BYTES]
    huge = {"messages": [{"role": "user", "content": "Summarise."}, {"role": "assistant", "content": text}]}
    big.write_text(_line(GOOD) * 10 + _line(huge) + _line(GOOD) * 10)
    limit = 1 << 20
    baseline = _peak(mode, small, tok, limit, truncate=False)
    rejected = _peak(mode, big, tok, limit, truncate=False) - baseline
    cut = _peak(mode, big, tok, limit, truncate=True) - baseline
    assert rejected < LINE_BYTES // 4  # the line is never held whole: it is read in 1 MiB pieces
    assert cut < READ_COPIES * LINE_BYTES + TOKENIZE_BYTES_PER_BYTE * limit
