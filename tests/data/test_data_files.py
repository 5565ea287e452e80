"""Files that are not UTF-8 JSONL are named in one line (E110), empty ones fail like training (E105), and lines are
read with bounded memory, in validate-data and in training alike."""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path

import pytest

from lumina_ds.cli import build_parser, main
from lumina_ds.config.run import RunConfig
from lumina_ds.data.records.files import HEAD_BYTES, LongLine, check_data_file, data_bytes, read_line
from lumina_ds.errors import LuminaError
from tests.helpers import read_conversations

LINE = b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}\n'
TEXT = (LINE * 3).decode()


def resolve_training(argv: list[str]) -> RunConfig:
    """What `lumina-ds train` checks before any work (the run directory is not created yet)."""
    from lumina_ds.cli.train import resolve_run

    return resolve_run(build_parser().parse_args(["train", *argv]), world_size=1, announce=False)


# name, bytes, words the one error line must hold, command in the hint
NOT_JSONL = [
    ("data.jsonl", gzip.compress(LINE * 3), "is gzip-compressed but its name does not end in .gz", "data.jsonl.gz"),
    ("u16.jsonl", TEXT.encode("utf-16"), "UTF-16 text (little-endian, with a byte-order mark)", "iconv -f UTF-16 "),
    ("u16be.jsonl", b"\xfe\xff" + TEXT.encode("utf-16-be"), "UTF-16 text (big-endian, with a byte-order", "UTF-16 "),
    ("u32.jsonl", TEXT.encode("utf-32"), "UTF-32 text (little-endian, with a byte-order mark)", "iconv -f UTF-32 "),
    ("nobom.jsonl", TEXT.encode("utf-16-le"), "UTF-16 text (little-endian, no byte-order mark)", "-f UTF-16LE "),
    ("z.jsonl", b"\x28\xb5\x2f\xfd" + b"\x00" * 40, "zstd-compressed", "zstd -dc z.jsonl > z.utf8.jsonl"),
    ("plain.jsonl.gz", LINE * 3, "ends in .gz but is not gzip-compressed", "plain.jsonl"),
    ("cut.jsonl.gz", gzip.compress(LINE * 300)[:60], "damaged gzip file", "gzip -t"),
    ("w.jsonl.gz", gzip.compress(TEXT.encode("utf-16")), "gzip-compressed UTF-16 text", "gunzip -c w.jsonl.gz | "),
]


@pytest.mark.parametrize(("name", "content", "words", "command"), NOT_JSONL, ids=[n for n, *_ in NOT_JSONL])
def test_a_file_that_is_not_utf8_jsonl_is_named_in_one_line(
    name: str, content: bytes, words: str, command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    assert main(["validate-data", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    error, hint = captured.err.strip().splitlines()  # one error line and its hint, not a line per data line
    assert error.startswith("error: [E110]") and words in error and str(path) in error
    assert hint.startswith("Hint:") and command in hint
    output = tmp_path / "runs"
    with pytest.raises(LuminaError) as err:  # training stops before any work, with the same message
        resolve_training(["--train-data", str(path), "--output-dir", str(output)])
    assert err.value.code == "E110" and words in err.value.message and not output.exists()


def test_the_hint_converts_utf16_into_the_same_conversations(tmp_path: Path) -> None:
    path = tmp_path / "u16.jsonl"
    path.write_bytes(TEXT.encode("utf-16"))
    with pytest.raises(LuminaError) as err:
        check_data_file(path)
    assert "> u16.utf8.jsonl" in err.value.hint
    (tmp_path / "u16.utf8.jsonl").write_text(path.read_bytes().decode("utf-16"), encoding="utf-8")  # = the iconv
    assert len(read_conversations(tmp_path / "u16.utf8.jsonl").conversations) == 3


def test_an_evaluation_file_is_checked_too(tmp_path: Path) -> None:
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_bytes(LINE)
    evaluation.write_bytes(TEXT.encode("utf-16"))
    with pytest.raises(LuminaError) as err:
        resolve_training(["--train-data", str(train), "--eval-data", str(evaluation)])
    assert err.value.code == "E110" and "eval.jsonl is UTF-16" in err.value.message


def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + LINE * 2)
    assert main(["validate-data", str(path), "--quiet"]) == 0
    assert "OK 2 lines, 2 valid, 0 errors" in capsys.readouterr().out
    assert len(read_conversations(path).conversations) == 2
    gz = tmp_path / "bom.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert len(read_conversations(gz).conversations) == 2


@pytest.mark.parametrize(("content", "words"), [(b"", "is empty"), (b"\n  \n\t\r\n", "holds only 3 blank line(s)")])
def test_an_empty_or_blank_file_fails_validation_as_it_fails_training(
    content: bytes, words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    assert main(["validate-data", str(path)]) == 1
    assert f"[E105] {path} {words}: no conversation to train on" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_bytes(LINE)
    for spec in (str(path), f"{good},{path}:0.5"):  # alone or among several files
        with pytest.raises(LuminaError) as err:
            resolve_training(["--train-data", spec, "--output-dir", str(tmp_path / "runs")])
        assert err.value.code == "E105" and words in err.value.message
    gz = tmp_path / "empty.jsonl.gz"
    gz.write_bytes(gzip.compress(content))
    assert main(["validate-data", str(good), str(gz)]) == 1
    assert f"[E105] {gz} {words}" in capsys.readouterr().err


def test_jsonl_size_of_a_gz(tmp_path: Path) -> None:
    path = tmp_path / "one.jsonl.gz"
    path.write_bytes(gzip.compress(LINE * 1000))
    assert data_bytes(path) == len(LINE) * 1000  # one member within the sample: exact
    members = tmp_path / "two.jsonl.gz"  # two members (`cat a.gz b.gz`): estimated from the first one's ratio
    members.write_bytes(gzip.compress(LINE * 1000) + gzip.compress(LINE * 1000))
    assert abs(data_bytes(members) - 2000 * len(LINE)) < 0.05 * 2000 * len(LINE)
    blanks = tmp_path / "blanks.jsonl.gz"  # highly compressible: the sample inflates only so far
    compressor = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    blanks.write_bytes(compressor.compress(b"\n" * (300 << 20)) + compressor.flush())
    assert data_bytes(blanks) >= 64 << 20


def test_a_line_past_the_limit_is_measured_not_held() -> None:
    limit = 1024
    data = b"a" * 1024 + b"\n" + b"b" * 1025 + b"\n" + b"c" * 5000 + b"\n" + LINE + b"d" * 1025
    handle = io.BytesIO(data)
    assert read_line(handle, max_bytes=limit) == b"a" * 1024 + b"\n"  # exactly the limit: kept
    assert read_line(handle, max_bytes=limit) == LongLine(size=1025, head=b"b" * HEAD_BYTES)
    assert read_line(handle, max_bytes=limit) == LongLine(size=5000, head=b"c" * HEAD_BYTES)
    assert read_line(handle, max_bytes=limit) == LINE  # the next line starts where it should
    assert read_line(handle, max_bytes=limit) == LongLine(size=1025, head=b"d" * HEAD_BYTES)  # no final newline
    assert read_line(handle, max_bytes=limit) == b""
    whole = io.BytesIO(data)
    read_line(whole, max_bytes=limit)
    assert read_line(whole, max_bytes=limit, whole=True) == b"b" * 1025 + b"\n"
