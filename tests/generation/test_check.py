"""Generation checks: prompts files, token agreement, the precision comparison and `lumina-ds generate-check`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lumina_ds.cli import main
from lumina_ds.errors import DataError
from lumina_ds.generation import SamplingConfig, generate, load_for_inference
from lumina_ds.generation.check import (
    DEFAULT_PROMPTS,
    GENERATIONS_FILE,
    agreement,
    precisions_for,
    read_prompts,
    run_check,
    summary,
)
from lumina_ds.models.transformer import Transformer
from lumina_ds.tokenizer import Message


@pytest.mark.parametrize(
    ("reference", "other", "expected"),
    [([1, 2, 3, 4], [1, 2, 3, 4], 1.0), ([1, 2, 3, 4], [1, 2, 9, 4], 0.5), ([5, 2], [1, 2], 0.0),
     ([1, 2, 3], [1, 2, 3, 4], 0.75), ([1, 2, 3, 4], [1, 2], 0.5), ([], [], 1.0), ([], [7], 0.0)],
)  # fmt: skip
def test_agreement_counts_tokens_up_to_the_first_difference(
    reference: list[int], other: list[int], expected: float
) -> None:
    # a difference ends the count even when later tokens agree again ([1, 2, 9, 4]: 2 of 4)
    assert agreement(reference, other) == expected


def test_read_prompts_plain_lines_and_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text('first prompt\n\n{"prompt": "from json", "id": 3}\n"a json string"\n  spaced  \n')
    assert read_prompts(path) == ["first prompt", "from json", "a json string", "spaced"]


@pytest.mark.parametrize(("text", "code"), [("", "E104"), ("{bad json\n", "E101"), ('{"text": "x"}\n', "E102")])
def test_bad_prompts_files_have_codes(tmp_path: Path, text: str, code: str) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        read_prompts(path)
    assert err.value.code == code
    with pytest.raises(DataError, match="not found"):
        read_prompts(tmp_path / "missing.txt")


def test_cpu_compares_fp32_with_bf16() -> None:
    assert precisions_for(torch.device("cpu")) == ["fp32", "bf16"]


def test_fp32_answers_are_greedy_and_bf16_is_scored_against_them(run_dir: tuple[Path, Transformer]) -> None:
    path, model = run_dir
    prompts = ["hello there", "the quick brown fox"]
    generations, written = run_check(path, prompts=prompts, max_new_tokens=12, compare_precisions=True,
                                     device=torch.device("cpu"))  # fmt: skip
    assert written == path / GENERATIONS_FILE
    records = [json.loads(line) for line in written.read_text().splitlines()]
    assert [(r["precision"], r["prompt"]) for r in records] == [("fp32", p) for p in prompts] + [
        ("bf16", p) for p in prompts
    ]
    bundle = load_for_inference(path)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
    for record, prompt in zip(records[:2], prompts, strict=True):
        expected = generate(model.eval(), bundle.tokenizer.encode_prompt([Message("user", prompt)]), greedy,
                            stop_ids=bundle.tokenizer.stop_ids)  # fmt: skip
        assert record["token_ids"] == expected and record["tokens"] == len(expected)
        assert record["reply"] == bundle.tokenizer.decode(expected)
        assert record["tokens_per_s"] > 0 and record["agreement"] is None
    for fp32, bf16 in zip(records[:2], records[2:], strict=True):
        assert bf16["agreement"] == agreement(fp32["token_ids"], bf16["token_ids"])
        assert bf16["exact_match"] == (fp32["token_ids"] == bf16["token_ids"])
    rows = {row["precision"]: row for row in summary(generations)}
    assert "agreement" not in rows["fp32"]
    assert rows["bf16"]["exact_matches"] == sum(r["exact_match"] for r in records[2:])


def test_generate_check_command(
    run_dir: tuple[Path, Transformer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello there"}\n')
    code = main(["generate-check", "--checkpoint", str(run_dir[0]), "--prompts", str(prompts), "--max-tokens", "4"])
    assert code == 0
    records = [json.loads(line) for line in (run_dir[0] / GENERATIONS_FILE).read_text().splitlines()]
    assert len(records) == 1 and records[0]["precision"] == "fp32" and records[0]["tokens"] <= 4
    assert "fp32: 1 prompts" in capsys.readouterr().out
    assert main(["generate-check", "--checkpoint", str(run_dir[0]), "--max-tokens", "3"]) == 0  # built-in prompts
    lines = (run_dir[0] / GENERATIONS_FILE).read_text().splitlines()
    assert [json.loads(line)["prompt"] for line in lines] == list(DEFAULT_PROMPTS)
