"""One registry of error codes: the table in docs/errors.md says exactly what it says, and every code is asserted by a
test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lumina_ds.errors import ERROR_CODES, ConfigError

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| (E\d{3}) \| (.+) \|$")


ERRORS_DOC = ROOT / "docs" / "errors.md"


def docs_table() -> dict[str, str]:
    text = ERRORS_DOC.read_text()
    section = text.split("\n## Error codes\n", 1)[1].split("\n## ", 1)[0]
    return {m[1]: m[2] for m in map(ROW.match, section.splitlines()) if m}


def test_docs_table_is_the_registry() -> None:
    assert docs_table() == ERROR_CODES


def test_every_code_is_expected_by_some_test() -> None:
    """A code no test expects can drift from what the CLI prints: each must be an expected value in some test."""
    texts = [p.read_text() for p in (ROOT / "tests").rglob("test_*.py") if p.name != Path(__file__).name]
    untested = [code for code in ERROR_CODES if not any(f'"{code}"' in t or f"[{code}]" in t for t in texts)]
    assert untested == []


def test_an_unregistered_code_is_a_bug() -> None:
    with pytest.raises(AssertionError, match="unregistered"):
        ConfigError("E999", "no such code")
