"""The CLI end to end in one process: train, auto-resume, chat, parameter estimates, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import EVAL, EXAMPLES, FAST, TRAIN, lumina, read_metrics

REQUIRED_LOG_FIELDS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "aux_loss", "expert_counts"}


def test_train_auto_resume_and_chat(workdir: Path) -> None:
    base = ["train", *FAST, "--train-data", TRAIN, "--eval-data", EVAL, "--experiment-name", "e2e"]
    first = lumina([*base, "--max-steps", "6", "--save-every-n-steps", "3", "--eval-every-n-steps", "3"], cwd=workdir)
    assert first.returncode == 0
    run_dir = workdir / "runs" / "e2e"
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "tensorboard", "report.png"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    tags = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert tags == ["step_00000003", "step_00000006"]
    assert all((run_dir / "checkpoints" / t / "complete.json").exists() for t in tags)
    logs, evals = read_metrics(run_dir)
    assert [r["step"] for r in logs] == [1, 2, 3, 4, 5, 6]
    assert all(r.keys() >= REQUIRED_LOG_FIELDS for r in logs)
    assert len(logs[0]["expert_counts"]) == 2 and len(logs[0]["expert_counts"][0]) == 4  # 2 MoE layers x 4 experts
    # every routed token is counted: 4 rows x 128 tokens x top-2 per layer
    assert sum(logs[0]["expert_counts"][0]) == 4 * 128 * 2
    assert [e["step"] for e in evals] == [3, 6] and evals[-1]["eval_tokens"] > 1000

    second = lumina([*base, "--max-steps", "9", "--auto-resume", "--save-every-n-steps", "100"], cwd=workdir)
    assert second.returncode == 0
    assert "resumed from" in second.stdout and "at step 6" in second.stdout
    logs, _ = read_metrics(run_dir)
    assert [r["step"] for r in logs] == [1, 2, 3, 4, 5, 6, 7, 8, 9]

    chat = lumina(["chat", "--checkpoint", str(run_dir), "--prompt", "Explain RoPE in one sentence.",
                   "--max-tokens", "16", "--seed", "0"], cwd=workdir)  # fmt: skip
    assert chat.returncode == 0
    assert chat.stdout.strip()


def test_malformed_lines_are_skipped_and_reported(workdir: Path) -> None:
    mixed = workdir / "mixed.jsonl"
    good = (EXAMPLES / "conversations.jsonl").read_text().splitlines()[:120]
    bad = (EXAMPLES / "bad_lines.jsonl").read_bytes()
    mixed.write_bytes(("\n".join(good) + "\n").encode() + bad)
    proc = lumina(
        ["train", *FAST, "--train-data", str(mixed), "--max-steps", "2", "--experiment-name", "bad"], cwd=workdir
    )
    assert proc.returncode == 0
    assert "skipped" in proc.stderr and "malformed line(s)" in proc.stderr
    # bad_lines.jsonl line 1 is valid, line 2 (here 122) is the first bad one; 12 of its 16 lines are bad
    assert "skipped 12 malformed" in proc.stderr and "line 122 (E101" in proc.stderr


def test_estimate_parameters_json(workdir: Path) -> None:
    proc = lumina(["estimate-parameters", "--preset", "b7", "--json"], cwd=workdir)
    assert proc.returncode == 0
    data = json.loads(proc.stdout)
    assert 7e9 * 0.85 <= data["total"] <= 7e9 * 1.15
    assert data["active"] < data["total"]
    assert sum(data["by_component"].values()) == data["total"]


def test_config_errors_have_codes(workdir: Path) -> None:
    proc = lumina(["train", "--train-data", TRAIN, "--zero-stage", "3", "--moe-backend", "native"], cwd=workdir)
    assert proc.returncode == 1
    assert "[E002]" in proc.stderr and "autoep" in proc.stderr
    proc = lumina(["train", "--train-data", TRAIN, "--expert-parallel-size", "3"], cwd=workdir)
    assert proc.returncode == 1 and "[E002]" in proc.stderr and "[1, 2, 4]" in proc.stderr
    proc = lumina(["chat", "--checkpoint", str(workdir / "nothing"), "--prompt", "hi"], cwd=workdir)
    assert proc.returncode == 1 and "[E303]" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only where there is no GPU")
def test_fp16_without_gpu_is_a_hardware_error(workdir: Path) -> None:
    proc = lumina(["train", "--train-data", TRAIN, "--precision", "fp16"], cwd=workdir)
    assert proc.returncode == 1 and "[E003]" in proc.stderr and "GPU" in proc.stderr


def test_module_help(workdir: Path) -> None:
    proc = lumina(["--help"], cwd=workdir)
    assert proc.returncode == 0 and "estimate-parameters" in proc.stdout and "chat" in proc.stdout


def test_an_outside_tokenizer_gets_the_chat_tokens_and_the_model_fits_it(workdir: Path) -> None:
    """--tokenizer takes any HF tokenizer.json: missing chat special tokens are appended, the embedding grows."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = (EXAMPLES / "conversations.jsonl").read_text().splitlines()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=3000, special_tokens=["[UNK]"], show_progress=False))
    tok.add_tokens([f"word{i}" for i in range(2500)])  # larger than the debug preset's 2048 embedding rows
    grown = -(-(tok.get_vocab_size() + 6) // 64) * 64  # + the 6 chat tokens, padded to a multiple of 64
    path = workdir / "outside.json"
    tok.save(str(path))
    args = [
        "train",
        *FAST,
        "--train-data",
        TRAIN,
        "--tokenizer",
        str(path),
        "--max-steps",
        "2",
        "--experiment-name",
        "tok",
    ]
    proc = lumina(args, cwd=workdir)
    assert proc.returncode == 0
    assert f"model vocab 2048 -> {grown}" in proc.stdout
    assert "added them with new ids" in proc.stdout + proc.stderr
    chat = lumina(
        ["chat", "--checkpoint", str(workdir / "runs" / "tok"), "--prompt", "hi", "--max-tokens", "4"], cwd=workdir
    )
    assert chat.returncode == 0
