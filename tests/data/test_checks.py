from __future__ import annotations

import json

import pytest

from lumina_ds.data.records.checks import check_line, fix_object
from lumina_ds.data.records.reader import parse_line
from lumina_ds.data.records.types import SkippedLine
from lumina_ds.data.validate.dedup import DigestSet, conversation_digest
from lumina_ds.data.validate.stats import EXACT_BELOW, Histogram
from lumina_ds.tokenizer import Message


def _line(*turns: tuple[str, str]) -> bytes:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}).encode() + b"\n"


def _kinds(raw: bytes) -> list[tuple[str, str, str]]:
    checked = check_line(1, raw)
    assert checked is not None
    return [(i.kind, i.code, i.severity) for i in checked.issues]


@pytest.mark.parametrize(
    ("raw", "kind", "code"),
    [
        (b"{nope", "invalid_json", "E101"),
        (b'"text"', "not_object", "E101"),
        (b'{"msgs": []}', "missing_messages", "E102"),
        (b'{"messages": {"role": "user"}}', "messages_not_list", "E101"),
        (b'{"messages": []}', "empty_messages", "E102"),
        (b'{"messages": [3]}', "message_not_object", "E101"),
        (b'{"messages": [{"content": "x"}]}', "missing_role", "E102"),
        (b'{"messages": [{"role": "user"}]}', "missing_content", "E102"),
        (b'{"messages": [{"role": 1, "content": "x"}]}', "wrong_type", "E101"),
        (b'{"messages": [{"role": "user", "content": null}]}', "wrong_type", "E101"),
        (_line(("narrator", "x"), ("assistant", "y")), "unknown_role", "E101"),
        (_line(("user", "x")), "role_order", "E101"),
        (_line(("assistant", "a"), ("assistant", "b")), "role_order", "E101"),
        (_line(("user", "a"), ("user", "b"), ("assistant", "c")), "role_order", "E101"),
        (_line(("user", "a"), ("assistant", "b"), ("user", "c")), "role_order", "E101"),
        (_line(("system", "s"), ("system", "t"), ("user", "a"), ("assistant", "b")), "role_order", "E101"),
        (b'{"messages": [{"role": "user", "content": "\xff"}]}', "invalid_utf8", "E103"),
        (_line(("user", "x\udc80"), ("assistant", "y")), "invalid_utf8", "E103"),
        (_line(("user", "x\ufffd"), ("assistant", "y")), "replacement_char", "E103"),
        (_line(("user", "x\x00"), ("assistant", "y")), "control_char", "E103"),
        (_line(("user", "x"), ("assistant", "y\x1b[0m")), "control_char", "E103"),
        (_line(("user", "x"), ("assistant", "\x85")), "control_char", "E103"),  # C1 control
        (_line(("user", "x"), ("assistant", " ")), "no_assistant_content", "E102"),
    ],
)
def test_each_error_kind_has_its_code(raw: bytes, kind: str, code: str) -> None:
    assert (kind, code, "error") in _kinds(raw)
    skipped = parse_line(7, raw)
    assert isinstance(skipped, SkippedLine)
    assert (skipped.line_no, skipped.code, skipped.kind) == (7, code, kind)


def test_allowed_whitespace_characters_are_not_control_errors() -> None:
    parsed = parse_line(1, _line(("user", "a\tb\r\nc"), ("assistant", "ok")))
    assert parsed == [Message("user", "a\tb\r\nc"), Message("assistant", "ok")]
    # A raw tab inside a JSON string is unambiguous text: accepted (strict JSON would reject it).
    assert parse_line(1, b'{"messages": [{"role": "user", "content": "a\tb"}, {"role": "ai", "content": "c"}]}') == [
        Message("user", "a\tb"),
        Message("assistant", "c"),
    ]


AB = [("user", "a"), ("assistant", "b")]


@pytest.mark.parametrize(
    ("turns", "kind", "kept"),
    [
        ([("system", ""), *AB], "empty_content", AB),
        ([*AB, ("user", " "), ("assistant", "")], "empty_content", AB),
        ([("Human", "a"), ("GPT", "b")], "role_alias", AB),
        ([("user", "a"), ("model", "b")], "role_alias", AB),
        ([("user", " a"), ("assistant", "b\n")], "whitespace", [("user", " a"), ("assistant", "b\n")]),
        ([("assistant", "greeting"), *AB], None, None),
    ],
)
def test_warnings_keep_the_line(turns: list[tuple[str, str]], kind: str | None, kept: list | None) -> None:
    raw = _line(*turns)
    warnings = [k for k, _, severity in _kinds(raw) if severity == "warning"]
    assert warnings == ([kind] if kind else [])
    expected = [Message(r, c) for r, c in kept] if kept else [Message(r, c) for r, c in turns]
    assert parse_line(1, raw) == expected


def test_dropping_an_empty_message_that_breaks_role_order_is_an_error() -> None:
    raw = _line(("user", "a"), ("assistant", ""), ("user", "b"), ("assistant", "c"))
    assert [k for k, _, _ in _kinds(raw)] == ["empty_content", "role_order"]
    skipped = parse_line(3, raw)
    assert isinstance(skipped, SkippedLine)
    assert "messages[0] and messages[2] are both user turns once the empty messages are dropped" in skipped.reason


def test_blank_lines_and_bom() -> None:
    assert check_line(4, b"  \r\n") is None
    assert parse_line(1, b"\xef\xbb\xbf" + _line(("user", "a"), ("assistant", "b"))) == [
        Message("user", "a"),
        Message("assistant", "b"),
    ]
    # A BOM is only expected at the start of the file.
    skipped = parse_line(2, b"\xef\xbb\xbf" + _line(("user", "a"), ("assistant", "b")))
    assert isinstance(skipped, SkippedLine) and skipped.kind == "invalid_json"


def test_fix_object_repairs_roles_controls_and_whitespace() -> None:
    obj = {"messages": [{"role": " Human", "content": " hi\x07 "}, {"role": "bot", "content": "\x00yo"}]}
    assert fix_object(obj) == [Message("user", "hi"), Message("assistant", "yo")]
    assert fix_object({"messages": [{"role": "wizard", "content": "x"}]}) is None
    assert fix_object([1]) is None


def test_digest_ignores_alias_spelling_and_outer_whitespace_only() -> None:
    base = conversation_digest([Message("user", "a"), Message("assistant", "b")])
    assert conversation_digest([Message("user", " a"), Message("assistant", "b ")]) == base
    assert conversation_digest([Message("user", "a b"), Message("assistant", "")]) != conversation_digest(
        [Message("user", "a"), Message("assistant", "b")]
    )
    assert conversation_digest([Message("assistant", "a"), Message("user", "b")]) != base


def test_digest_set_grows_and_remembers() -> None:
    seen = DigestSet(capacity_log2=4)
    values = [(i * 0x9E3779B97F4A7C15) % 2**64 for i in range(1, 1001)] + [0]
    assert all(seen.add(v) for v in values)
    assert not any(seen.add(v) for v in values)
    assert len(seen) == 1001
    # Load stays at or under 70%: 1001 digests need 2048 slots (8 bytes each).
    assert seen.nbytes == 2048 * 8


def test_histogram_nearest_rank_percentiles_exact_below_threshold() -> None:
    hist = Histogram()
    for value in [5, 1, 3, 2, 4, 100, 7, 7, 9, 0]:
        hist.add(value)
    # Sorted: 0 1 2 3 4 5 7 7 9 100; nearest rank ceil(p*n): p50 -> 5th = 4, p90 -> 9th = 9, p99 -> 10th = 100.
    summary = hist.summary()
    assert {k: summary[k] for k in ("count", "mean", "min", "p50", "p90", "p99", "max")} == {
        "count": 10,
        "mean": 13.8,
        "min": 0,
        "p50": 4,
        "p90": 9,
        "p99": 100,
        "max": 100,
    }
    # Log-spaced buckets 0 | 1 | 2-3 | 4-7 | 8-15 | ... | 64-127.
    rows = [[0, 0, 1], [1, 1, 1], [2, 3, 2], [4, 7, 4], [8, 15, 1], [16, 31, 0], [32, 63, 0], [64, 127, 1]]
    assert summary["histogram"] == rows


def test_histogram_large_values_are_within_a_sixteenth_octave() -> None:
    hist = Histogram()
    values = [EXACT_BELOW + 17 * i * i for i in range(2000)]
    for value in values:
        hist.add(value)
    assert (hist.min, hist.max, hist.count) == (values[0], values[-1], 2000)
    for p in (50, 90, 99):
        exact = sorted(values)[-(-p * 2000 // 100) - 1]
        assert abs(hist.percentile(p) - exact) <= exact / 16
    # Memory is bounded by the number of buckets, not the number of values.
    hist2 = Histogram()
    for value in range(200_000):
        hist2.add(value * 7)
    assert len(hist2._counts) < EXACT_BELOW + 16 * 64
