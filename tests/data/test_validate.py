from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lumina_ds.cli import main
from lumina_ds.data.records.reader import iter_conversations
from lumina_ds.data.records.types import SkippedLine
from lumina_ds.data.validate.validator import count_tokens
from lumina_ds.errors import DataError
from lumina_ds.tokenizer import ChatTemplate, ChatTokenizer
from tests.helpers import read_conversations

# examples/validation_errors.jsonl (examples/make_validation_errors.py): the error lines training skips ...
ERRORS = {
    2: ("E101", "invalid_json"),
    3: ("E101", "not_object"),
    4: ("E102", "missing_messages"),
    5: ("E101", "messages_not_list"),
    6: ("E102", "empty_messages"),
    7: ("E101", "message_not_object"),
    8: ("E102", "missing_role"),
    9: ("E102", "missing_content"),
    10: ("E101", "wrong_type"),
    11: ("E101", "unknown_role"),
    12: ("E101", "role_order"),  # two assistant turns in a row
    13: ("E101", "role_order"),  # two user turns in a row
    14: ("E101", "role_order"),  # ends with a user turn
    15: ("E101", "role_order"),  # system not first
    16: ("E103", "invalid_utf8"),
    17: ("E103", "replacement_char"),
    18: ("E103", "control_char"),
    19: ("E102", "no_assistant_content"),
    27: ("E101", "role_order"),  # an empty assistant message dropped leaves two user turns in a row
    28: ("E103", "invalid_utf8"),  # "\ud800" escape: a lone surrogate
    29: ("E103", "control_char"),
}
# ... the warnings on lines training keeps (line 20 is blank; 1 and 21 are clean) ...
WARNINGS = {22: "empty_content", 23: "duplicate", 24: "role_alias", 25: "whitespace"}
KEPT = [1, 21, 22, 23, 24, 25, 26]
# ... and what --fix-errors does: line 18 loses its control character, 23 (a copy of line 1) is dropped, line 29's
# only assistant content was a control character, so its repair fails the re-check.
REJECTED = {n: code for n, (code, _) in ERRORS.items() if n != 18} | {29: "E102"}


@pytest.fixture
def fixture_file(examples_dir: Path) -> Path:
    return examples_dir / "validation_errors.jsonl"


def _by_line(issues: list[dict], severity: str) -> dict[int, tuple[str, str]]:
    return {i["line"]: (i["code"], i["kind"]) for i in issues if i["severity"] == severity}


def test_report_names_every_kind_with_its_lines(fixture_file: Path, tmp_path: Path, capsys) -> None:
    report_path = tmp_path / "report.json"
    assert main(["validate-data", str(fixture_file), "--report", str(report_path)]) == 1
    report = json.loads(report_path.read_text())
    assert _by_line(report["issues"], "error") == ERRORS
    assert {n: kind for n, (_, kind) in _by_line(report["issues"], "warning").items()} == WARNINGS
    assert (report["lines"], report["blank"], report["valid"], report["ok"]) == (29, 1, 7, False)
    assert report["errors"]["role_order"] == 5 and report["errors"]["invalid_utf8"] == 2
    assert report["warnings"] == {k: 1 for k in WARNINGS.values()}
    assert report["truncated"] == 0
    out = capsys.readouterr().out
    assert "E101 role_order" in out and "lines 12, 13, 14, 15, 27" in out
    assert "W104 duplicate" in out and "line 23" in out
    assert "FAIL: 21 lines with errors" in out


def test_training_reader_skips_exactly_the_error_lines(fixture_file: Path) -> None:
    result = read_conversations(fixture_file)
    assert {s.line_no: (s.code, s.kind) for s in result.skipped} == ERRORS
    assert len(result.conversations) == len(KEPT) == 7
    kept = [n for n, item in iter_conversations(fixture_file) if not isinstance(item, SkippedLine)]
    assert kept == KEPT
    # Line 22's empty system message is dropped; line 24's aliases are canonical.
    assert [m.role for m in result.conversations[2]] == ["user", "assistant"]
    assert [m.role for m in result.conversations[4]] == ["user", "assistant"]


def test_strict_stops_at_the_first_error(fixture_file: Path, tmp_path: Path, capsys) -> None:
    assert main(["validate-data", str(fixture_file), "--strict"]) == 1
    err = capsys.readouterr().err
    assert "[E101]" in err and "line 2: invalid JSON" in err
    late = tmp_path / "late.jsonl"
    late.write_bytes(fixture_file.read_bytes().splitlines(keepends=True)[0] + b'{"messages": [{"role": "user"}]}\n')
    with pytest.raises(DataError) as info:
        read_conversations(late, strict=True)
    assert info.value.code == "E102"
    assert "line 2: messages[0] has no 'content' field" in info.value.message


def test_fix_errors_round_trip(fixture_file: Path, tmp_path: Path, capsys) -> None:
    fixed, rejects = tmp_path / "fixed.jsonl", tmp_path / "rejects.jsonl"
    argv = ["validate-data", str(fixture_file), "--fix-errors", "--output", str(fixed), "--rejects", str(rejects)]
    assert main(argv) == 1
    assert "fix: wrote 7 conversations (4 repaired), dropped 1 duplicates, rejected 20 lines" in capsys.readouterr().out
    rejected = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert {r["line"]: r["code"] for r in rejected} == REJECTED
    assert rejected[-1]["kind"] == "no_assistant_content" and "after repair" in rejected[-1]["reason"]
    assert rejected[0]["raw"] == '{"messages": ['
    assert "caf\ufffd" in next(r["raw"] for r in rejected if r["line"] == 16)  # invalid byte shown replaced
    rows = [json.loads(line)["messages"] for line in fixed.read_text().splitlines()]
    assert rows[1] == [{"role": "user", "content": "Ring the bell"}, {"role": "assistant", "content": "Ding."}]
    assert rows[3][0] == {"role": "user", "content": "What is RoPE?"}  # empty system message dropped
    assert rows[4][0]["role"] == "user" and rows[4][1]["role"] == "assistant"
    assert rows[5] == [
        {"role": "user", "content": "What is warmup?"},
        {"role": "assistant", "content": "A slow start."},
    ]
    report_path = tmp_path / "fixed_report.json"
    assert main(["validate-data", str(fixed), "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert (report["errors"], report["warnings"], report["valid"]) == ({}, {}, 7)


def test_tokenizer_stats_and_too_long(fixture_file: Path, tokenizer: ChatTokenizer, tmp_path: Path) -> None:
    tokenizer_path = tmp_path / "tokenizer.json"
    tokenizer.save(tokenizer_path)
    report_path = tmp_path / "r.json"
    argv = ["validate-data", str(fixture_file), "--tokenizer", str(tokenizer_path), "--seq-len", "256"]
    assert main([*argv, "--report", str(report_path)]) == 1
    report = json.loads(report_path.read_text())
    assert {i["line"] for i in report["issues"] if i["kind"] == "too_long"} == {26}
    conversations = read_conversations(fixture_file).conversations
    template = ChatTemplate()
    totals = [count_tokens(c, tokenizer)[1] for c in conversations]
    # The count is what the training template produces, token for token.
    assert totals == [len(template.encode_conversation(c, tokenizer)[0]) for c in conversations]
    stats = report["stats"]["tokens_per_conversation"]
    assert (stats["count"], stats["max"], stats["min"]) == (7, max(totals), min(totals))
    assert report["stats"]["tokens"] == sum(totals)


def test_stats_on_a_hand_made_file(tmp_path: Path, capsys) -> None:
    def line(*turns: tuple[str, str]) -> str:
        return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n"

    first = line(("user", "ab"), ("assistant", "abcd"))
    path = tmp_path / "tiny.jsonl"
    path.write_text(
        first
        + line(("system", "x"), ("user", "hello"), ("assistant", "abcdefghij"))
        + line(("user", "abc"), ("assistant", "ab"), ("user", "a"), ("assistant", "abcdefgh"))
        + line(("user", "abcdef"), ("assistant", "abcdefghijklmnopqrst"))
        + first  # duplicates count in the statistics
    )
    report_path = tmp_path / "tiny_report.json"
    assert main(["validate-data", str(path), "--show-stats", "--report", str(report_path)]) == 0
    stats = json.loads(report_path.read_text())["stats"]
    assert stats["messages_by_role"] == {"assistant": 6, "system": 1, "user": 6}
    # Message lengths sorted: 1 1 2 2 2 3 4 4 5 6 8 10 20 (13 values, sum 68). Nearest rank: p50 = 7th = 4,
    # p90 = ceil(11.7) = 12th = 10, p99 = 13th = 20.
    chars = stats["chars_per_message"]
    assert {k: chars[k] for k in ("count", "mean", "min", "p50", "p90", "p99", "max")} == {
        "count": 13,
        "mean": round(68 / 13, 3),
        "min": 1,
        "p50": 4,
        "p90": 10,
        "p99": 20,
        "max": 20,
    }
    assert chars["histogram"] == [[1, 1, 2], [2, 3, 4], [4, 7, 4], [8, 15, 2], [16, 31, 1]]
    # Turns 2 3 4 2 2 -> sorted 2 2 2 3 4: p50 = 3rd = 2, p90 = ceil(4.5) = 5th = 4.
    turns = stats["turns_per_conversation"]
    assert (turns["count"], turns["mean"], turns["p50"], turns["p90"], turns["max"]) == (5, 2.6, 2, 4, 4)
    out = capsys.readouterr().out
    assert "chars per message: count 13, mean 5.231, min 1, p50 4, p90 10, p99 20, max 20" in out
    # Bars scale to the fullest bucket (4 values = 40 '#').
    assert "        2 - 3         |" + "#" * 40 + " 4" in out
    assert "        8 - 15        |" + "#" * 20 + " " * 21 + "2" in out


def test_quiet_create_report_and_flag_errors(fixture_file: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["validate-data", str(fixture_file), "--quiet", "--create-report"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"{fixture_file}: FAIL 29 lines, 7 valid, 21 errors, 4 warnings"]
    assert json.loads((tmp_path / "validation_errors_report.json").read_text())["valid"] == 7
    for bad in (["--seq-len", "64"], ["--output", "x.jsonl"], ["--fix-errors"], ["--quiet", "--show-stats"]):
        assert main(["validate-data", str(fixture_file), *bad]) == 1
        assert "[E002]" in capsys.readouterr().err
    assert main(["validate-data", str(tmp_path / "missing.jsonl")]) == 1
    assert "[E104]" in capsys.readouterr().err


def test_issue_list_is_capped_but_counts_are_not(tmp_path: Path) -> None:
    path = tmp_path / "many.jsonl"
    path.write_text("[]\n" * 1500)
    report_path = tmp_path / "many_report.json"
    assert main(["validate-data", str(path), "--report", str(report_path)]) == 1
    report = json.loads(report_path.read_text())
    assert (len(report["issues"]), report["truncated"], report["errors"]) == (1000, 500, {"not_object": 1500})


# validate-data reads a file line by line: its peak memory must not grow with the file. Holding the lines of the
# 128 MiB file would add over 128 MiB; the duplicate table grows by 8 bytes per slot at <= 70% load (150k lines:
# 2 MiB); importing torch alone adds ~220 MiB. A 16 MiB allowance catches the first and the last with room for
# allocator slack.
GROWTH_ALLOWANCE_MIB = 16
# VmHWM is the peak RSS of this process image; ru_maxrss would carry over the forking parent's (pytest's) peak.
_CHILD = """
import json, sys
from lumina_ds.cli import main
code = main(sys.argv[1:])
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
peak = int(status["VmHWM"].split()[0])
print(json.dumps({"code": code, "peak_kib": peak, "torch": "torch" in sys.modules, "ds": "deepspeed" in sys.modules}))
"""


def _write_big_file(path: Path, target_bytes: int) -> int:
    """Unique conversations (a counter in every message) of ~900 bytes; returns the number of lines."""
    template = json.dumps(
        {
            "messages": [
                {"role": "system", "content": "You are a concise assistant. #%d"},
                {"role": "user", "content": "Question %d: how does a router pick experts in a MoE layer, briefly?"},
                {
                    "role": "assistant",
                    "content": "Answer %d: " + ("it scores every expert and keeps the top-k. " * 16).strip(),
                },
            ]
        }
    )
    block_lines = 1_000
    written = lines = 0
    with path.open("w", encoding="utf-8") as handle:
        while written < target_bytes:
            block = "".join(template.replace("%d", str(lines + i)) + "\n" for i in range(block_lines))
            handle.write(block)
            written += len(block)
            lines += block_lines
    return lines


def _validate_in_a_fresh_process(path: Path) -> tuple[dict[str, object], str]:
    proc = subprocess.run([sys.executable, "-c", _CHILD, "validate-data", str(path), "--quiet"], capture_output=True,
                          text=True, check=False)  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    peaks = {}
    for size in (1 << 20, 128 << 20):
        path = tmp_path / f"big{size}.jsonl"
        lines = _write_big_file(path, size)
        try:
            result, output = _validate_in_a_fresh_process(path)
        finally:
            path.unlink()
        assert result["code"] == 0, output
        assert f"OK {lines:,} lines, {lines:,} valid, 0 errors, 0 warnings" in output
        assert not result["torch"] and not result["ds"]
        peaks[size] = int(result["peak_kib"]) / 1024  # type: ignore[call-overload]
    assert peaks[128 << 20] - peaks[1 << 20] < GROWTH_ALLOWANCE_MIB, peaks
