"""`validate-data`: one streaming pass over data sources; issues per line or row, statistics, optional repair."""

from __future__ import annotations

import contextlib
import gzip
import json
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from lumina_ds.data.records.checks import (
    DEFAULT_LIMIT,
    ERROR,
    KINDS,
    Issue,
    LineCheck,
    LineLimit,
    RawRecord,
    as_object,
    check_line,
    fix_object,
)
from lumina_ds.data.records.files import LongLine, is_gzip
from lumina_ds.data.records.formats import Row
from lumina_ds.data.records.sources import DataSource, numbered_records, open_source, require_conversation_lines
from lumina_ds.data.validate.dedup import DigestSet, conversation_digest
from lumina_ds.data.validate.stats import DatasetStats, render
from lumina_ds.errors import ConfigError
from lumina_ds.tokenizer import Message, TokenizerLike

MAX_ISSUES = 1000
FIRST_LINES = 5  # line numbers kept per kind for the human summary
_FIX_KINDS = frozenset({"control_char", "empty_content", "role_alias", "whitespace"})


def count_tokens(messages: Sequence[Message], tokenizer: TokenizerLike) -> tuple[list[int], int]:
    """Tokens per message content and of the whole templated conversation (as ChatTemplate encodes it)."""
    per_message = [len(tokenizer.encode(m.content)) for m in messages]
    newline = len(tokenizer.encode("\n"))
    # <|bos|>, then per message: role token, newline, content, <|end|>, newline.
    return per_message, 1 + sum(n + 2 + 2 * newline for n in per_message)


class Fixer:
    """Writes repaired conversations and rejected lines while the validator streams (`--fix-errors`)."""

    def __init__(self, output: IO[str], rejects: IO[str], *, limit: LineLimit = DEFAULT_LIMIT) -> None:
        self._output, self._rejects, self._limit = output, rejects, limit
        self._seen = DigestSet()
        self.counts = {"written": 0, "fixed": 0, "rejected": 0, "duplicates_dropped": 0}

    def handle(self, where: dict[str, Any], raw: RawRecord, checked: LineCheck) -> None:
        """Write the line repaired, drop it as a duplicate, or reject it."""
        error = checked.error
        repaired = fix_object(checked.obj) if error is None or error.kind == "control_char" else None
        if repaired is None:
            self._reject(where, raw, error)
            return
        # Re-checking the line as written drops the messages the repair emptied, cuts it to --max-line-bytes with
        # --truncate-long, and guarantees the fixed file validates cleanly.
        line = json.dumps(as_object(repaired), ensure_ascii=False)
        recheck = check_line(2, line.encode("utf-8"), self._limit)
        assert recheck is not None, "a repaired conversation is never blank"
        if recheck.messages is None:
            failure = recheck.error
            assert failure is not None
            self._reject(where, raw, Issue(failure.kind, f"after repair: {failure.reason}"))
            return
        if not self._seen.add(conversation_digest(recheck.messages)):
            self.counts["duplicates_dropped"] += 1
            return
        self._output.write(json.dumps(as_object(recheck.messages), ensure_ascii=False) + "\n")
        self.counts["written"] += 1
        self.counts["fixed"] += any(i.kind in _FIX_KINDS for i in checked.issues)

    def _reject(self, where: dict[str, Any], raw: RawRecord, error: Issue | None) -> None:
        assert error is not None
        if isinstance(raw, Row):  # a table's row, written as JSON (values JSON has no type for as text)
            text = json.dumps(raw.value, ensure_ascii=False, default=str)
        elif isinstance(raw, LongLine):  # never read whole: its first bytes say which line it is
            text = raw.head.decode("utf-8", errors="replace") + f"... ({raw.size:,} bytes)"
        else:
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        record = {**where, "code": error.code, "kind": error.kind, "reason": error.reason, "raw": text}
        self._rejects.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.counts["rejected"] += 1


class Validator:
    """Accumulates issues and statistics over one or more files, streaming each line once."""

    def __init__(
        self,
        *,
        tokenizer: TokenizerLike | None = None,
        seq_len: int | None = None,
        strict: bool = False,
        fixer: Fixer | None = None,
        max_issues: int = MAX_ISSUES,
        limit: LineLimit = DEFAULT_LIMIT,
    ) -> None:
        if seq_len is not None and (tokenizer is None or seq_len < 1):
            raise ConfigError("E002", "--seq-len needs --tokenizer and a positive value", "Add --tokenizer FILE.")
        self.tokenizer, self.seq_len, self.strict, self.fixer = tokenizer, seq_len, strict, fixer
        self.max_issues, self.limit = max_issues, limit
        self.files: list[str] = []
        self.units: dict[str, str] = {}  # what each source's record numbers count: line or row
        self.lines = self.blank = self.valid = self.truncated = 0
        self.counts: dict[str, defaultdict[str, int]] = {"error": defaultdict(int), "warning": defaultdict(int)}
        self.issues: list[dict[str, Any]] = []
        self.first_lines: defaultdict[str, list[tuple[str, int]]] = defaultdict(list)
        self.stats = DatasetStats(with_tokens=tokenizer is not None)
        self._seen = DigestSet()

    def validate_file(self, location: str | Path | DataSource) -> None:
        """Check every record of one source (streaming: memory does not grow with a JSONL file or a line; tables
        are read a batch of rows at a time)."""
        opened = open_source(location, self.limit.record_format)
        name, limit, unit = str(opened.source), opened.limit(self.limit), opened.source.unit
        self.files.append(name)
        self.units[name] = unit
        for number, raw in numbered_records(opened, limit):
            self._line(name, number, raw, limit)
            self.lines += 1

    def _line(self, path: str, line_no: int, raw: RawRecord, limit: LineLimit) -> None:
        checked = check_line(line_no, raw, limit)
        if checked is None:
            self.blank += 1
            return
        unit = self.units[path]
        where = {"file": path, unit: line_no}  # "row" for a table's rows, which have no line
        error = checked.error
        if error is not None:
            if self.strict:
                raise error.to_error(f"{path} {unit} {line_no}: ")
            # Warnings of a skipped line would only repeat the error (its reason says if empty messages broke it).
            self._record(where, error)
        else:
            assert checked.messages is not None
            self._kept(checked.messages, checked.issues)
            for issue in checked.issues:
                self._record(where, issue)
        if self.fixer is not None:
            self.fixer.handle(where, raw, checked)

    def _kept(self, messages: list[Message], issues: list[Issue]) -> None:
        """A line training uses: duplicate and length checks, statistics."""
        self.valid += 1
        if not self._seen.add(conversation_digest(messages)):
            issues.append(Issue("duplicate", "same conversation as an earlier line (roles and trimmed contents)"))
        tokens = None
        if self.tokenizer is not None:
            tokens = count_tokens(messages, self.tokenizer)
            if self.seq_len is not None and tokens[1] > self.seq_len:
                reason = f"{tokens[1]:,} tokens, longer than --seq-len {self.seq_len:,}; training truncates it"
                issues.append(Issue("too_long", reason))
        self.stats.add(messages, tokens)

    def _record(self, where: dict[str, Any], issue: Issue) -> None:
        kind = KINDS[issue.kind]
        self.counts[kind.severity][kind.name] += 1
        firsts = self.first_lines[kind.name]
        if len(firsts) < FIRST_LINES:
            firsts.append((where["file"], where.get("line", where.get("row", 0))))
        if len(self.issues) >= self.max_issues:
            self.truncated += 1
            return
        self.issues.append({**where, "code": kind.code, "kind": kind.name, "severity": kind.severity})
        self.issues[-1]["reason"] = issue.reason

    @property
    def ok(self) -> bool:
        """True when no line has an error."""
        return not self.counts[ERROR]

    def report(self) -> dict[str, Any]:
        """The JSON report."""
        report: dict[str, Any] = {
            "files": self.files,
            "lines": self.lines,
            "blank": self.blank,
            "valid": self.valid,
            "errors": dict(sorted(self.counts["error"].items())),
            "warnings": dict(sorted(self.counts["warning"].items())),
            "issues": self.issues,
            "truncated": self.truncated,
            "stats": self.stats.summary(),
            "ok": self.ok,
        }
        if self.fixer is not None:
            report["fix"] = dict(self.fixer.counts)
        return report


def _text_output(path: str | Path) -> IO[str]:
    """A UTF-8 text file to write, gzip-compressed when its name ends in .gz."""
    if is_gzip(path):
        return gzip.open(path, "wt", encoding="utf-8")
    return open(path, "w", encoding="utf-8")


@contextlib.contextmanager
def _fixer(
    fix_output: str | Path | None, rejects_output: str | Path | None, limit: LineLimit
) -> Iterator[Fixer | None]:
    if fix_output is None or rejects_output is None:
        yield None
        return
    with _text_output(fix_output) as out, _text_output(rejects_output) as rejects:
        yield Fixer(out, rejects, limit=limit)


def validate_files(
    paths: Sequence[str | Path],
    *,
    tokenizer: TokenizerLike | None = None,
    seq_len: int | None = None,
    strict: bool = False,
    fix_output: str | Path | None = None,
    rejects_output: str | Path | None = None,
    limit: LineLimit = DEFAULT_LIMIT,
) -> Validator:
    """Validate files in order (duplicates are found across them); with `fix_output`, also write the repair.

    Every source is first checked as training checks it before any work: it exists (E104), is of a kind lumina-ds
    reads (E110) and holds a non-blank line or a row (E105).
    """
    if (fix_output is None) != (rejects_output is None):
        raise ConfigError("E002", "a fixed output and a rejects output go together", "Pass both paths.")
    for path in paths:
        require_conversation_lines(path)
    for target in (t for t in (fix_output, rejects_output) if t is not None):
        if any(Path(target).resolve() == Path(str(p)).resolve() for p in paths):
            raise ConfigError("E002", f"{target} is also an input file", "Write the fixed data to a new file.")
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    with _fixer(fix_output, rejects_output, limit) as fixer:
        validator = Validator(tokenizer=tokenizer, seq_len=seq_len, strict=strict, fixer=fixer, limit=limit)
        for path in paths:
            validator.validate_file(path)
    return validator


def _where(firsts: list[tuple[str, int]], total: int, *, with_file: bool, word: str) -> str:
    locations = [f"{path}:{line}" if with_file else str(line) for path, line in firsts]
    word = word.removesuffix("s") if total == 1 else word
    return f"{word} {', '.join(locations)}{', ...' if total > len(firsts) else ''}"


def _records_word(validator: Validator) -> str:
    """What the numbers count: rows when every source is a table, lines otherwise."""
    return "rows" if validator.units and set(validator.units.values()) == {"row"} else "lines"


def quiet_line(validator: Validator) -> str:
    """One summary line (`--quiet`)."""
    errors, warnings = (sum(validator.counts[s].values()) for s in ("error", "warning"))
    verdict = "OK" if validator.ok else "FAIL"
    word = _records_word(validator)
    counts = f"{validator.lines:,} {word}, {validator.valid:,} valid, {errors:,} errors, {warnings:,} warnings"
    return f"{', '.join(validator.files)}: {verdict} {counts}"


def summary_lines(validator: Validator, *, show_stats: bool = False) -> list[str]:
    """The human summary: counts by kind with their first line (row) numbers, statistics, fix counts, verdict."""
    errors, warnings = (sum(validator.counts[s].values()) for s in ("error", "warning"))
    word = _records_word(validator)
    lines = [
        f"{', '.join(validator.files)}: {validator.lines:,} {word} ({validator.blank:,} blank), "
        f"{validator.valid:,} conversations training uses, {errors:,} {word} with errors, {warnings:,} warnings"
    ]
    with_file = len(validator.files) > 1
    headings = {
        "error": f"errors (training skips these {word}):",
        "warning": f"warnings (training keeps these {word}):",
    }
    for severity, heading in headings.items():
        counts = validator.counts[severity]
        if counts:
            lines.append(heading)
        for name in (k for k in KINDS if k in counts):
            where = _where(validator.first_lines[name], counts[name], with_file=with_file, word=word)
            lines.append(f"  {KINDS[name].code} {name:<20} {counts[name]:>9,}  {KINDS[name].title}; {where}")
    if show_stats:
        lines.extend(_stats_lines(validator.stats))
    if validator.fixer is not None:
        c = validator.fixer.counts
        lines.append(
            f"fix: wrote {c['written']:,} conversations ({c['fixed']:,} repaired), "
            f"dropped {c['duplicates_dropped']:,} duplicates, rejected {c['rejected']:,} {word}"
        )
    verdict = "OK: no errors" if validator.ok else f"FAIL: {errors:,} {word} with errors (training would skip them)"
    lines.append(verdict)
    return lines


def _stats_lines(stats: DatasetStats) -> list[str]:
    roles = ", ".join(f"{role} {n:,}" for role, n in sorted(stats.messages_by_role.items()))
    lines = ["statistics (conversations training uses, duplicates included):", f"messages by role: {roles or 'none'}"]
    for name, hist in stats.histograms().items():
        lines.extend(render(name.replace("_", " "), hist.summary()))
    return lines
