"""The CLI end to end as a user runs it: train, auto-resume, chat, parameter estimates, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.runs import EXAMPLES, FAST, SHARED_STEPS, TRAIN, here, read_metrics, subprocess_lumina

REQUIRED_LOG_FIELDS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "aux_loss", "expert_counts"}


def test_a_finished_run_holds_its_files_tags_logs_and_evaluations(shared_run: Path) -> None:
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "tensorboard", "report.png", "ds_config.json"):
        assert (shared_run / name).exists(), name
    assert list((shared_run / "tensorboard").glob("events.out.tfevents.*"))
    tags = sorted(p.name for p in (shared_run / "checkpoints").glob("step_*"))
    assert tags == [f"step_{s:08d}" for s in range(2, SHARED_STEPS + 1, 2)]
    assert all((shared_run / "checkpoints" / t / "complete.json").exists() for t in tags)
    logs, evals = read_metrics(shared_run)
    assert [r["step"] for r in logs] == list(range(1, SHARED_STEPS + 1))
    assert all(r.keys() >= REQUIRED_LOG_FIELDS for r in logs)
    assert len(logs[0]["expert_counts"]) == 2 and len(logs[0]["expert_counts"][0]) == 4  # 2 MoE layers x 4 experts
    # every routed token is counted: 4 rows x 128 tokens x top-2 per layer
    assert sum(logs[0]["expert_counts"][0]) == 4 * 128 * 2
    assert [e["step"] for e in evals] == [4, 8, 12] and evals[-1]["eval_tokens"] > 1000


def test_auto_resume_continues_the_run_and_chat_answers(copied_run: Path, workdir: Path) -> None:
    args = ["train", *FAST, "--train-data", TRAIN, "--experiment-name", "shared", "--max-steps", "15", "--auto-resume"]
    second = here(args, cwd=workdir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and f"at step {SHARED_STEPS}" in second.stdout
    logs, _ = read_metrics(copied_run)
    assert [r["step"] for r in logs] == list(range(1, 16))
    chat = here(["chat", "--checkpoint", str(copied_run), "--prompt", "Explain RoPE in one sentence.",
                 "--max-tokens", "16", "--seed", "0"], cwd=workdir)  # fmt: skip
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert chat.stdout.strip()


def test_malformed_lines_are_skipped_and_reported(shared_run: Path, workdir: Path) -> None:
    mixed = workdir / "mixed.jsonl"
    good = (EXAMPLES / "conversations.jsonl").read_text().splitlines()[:120]
    bad = (EXAMPLES / "bad_lines.jsonl").read_bytes()
    mixed.write_bytes(("\n".join(good) + "\n").encode() + bad)
    proc = here(["train", *FAST, "--train-data", str(mixed), "--max-steps", "2", "--experiment-name", "bad",
                 "--tokenizer", str(shared_run / "tokenizer.json")], cwd=workdir)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped" in proc.stderr and "malformed line(s)" in proc.stderr
    # bad_lines.jsonl line 1 is valid, line 2 (here 122) is the first bad one; 12 of its 16 lines are bad
    assert "skipped 12 malformed" in proc.stderr and "line 122 (E101" in proc.stderr


def test_estimate_parameters_json(workdir: Path) -> None:
    proc = here(["estimate-parameters", "--preset", "b7", "--json"], cwd=workdir)
    assert proc.returncode == 0
    data = json.loads(proc.stdout)
    assert 7e9 * 0.85 <= data["total"] <= 7e9 * 1.15
    assert data["active"] < data["total"]
    assert sum(data["by_component"].values()) == data["total"]


def test_config_errors_have_codes(workdir: Path) -> None:
    proc = here(["train", "--train-data", TRAIN, "--zero-stage", "3", "--moe-backend", "native"], cwd=workdir)
    assert proc.returncode == 1
    assert "[E002]" in proc.stderr and "autoep" in proc.stderr
    proc = here(["train", "--train-data", TRAIN, "--expert-parallel-size", "3"], cwd=workdir)
    assert proc.returncode == 1 and "[E002]" in proc.stderr and "[1, 2, 4]" in proc.stderr
    proc = here(["chat", "--checkpoint", str(workdir / "nothing"), "--prompt", "hi"], cwd=workdir)
    assert proc.returncode == 1 and "[E303]" in proc.stderr
    assert not (workdir / "runs").exists()  # a refused run leaves nothing behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only where there is no GPU")
def test_fp16_without_gpu_is_a_hardware_error(workdir: Path) -> None:
    proc = here(["train", "--train-data", TRAIN, "--precision", "fp16"], cwd=workdir)
    assert proc.returncode == 1 and "[E003]" in proc.stderr and "GPU" in proc.stderr


def test_module_help(workdir: Path) -> None:
    """`python -m lumina_ds` in a fresh interpreter: the package runs as a module."""
    proc = subprocess_lumina(["--help"], cwd=workdir)
    assert proc.returncode == 0 and "estimate-parameters" in proc.stdout and "chat" in proc.stdout


def test_the_old_spelling_of_a_renamed_flag_works_and_says_the_new_one(workdir: Path) -> None:
    proc = here(["train", "--train-data", TRAIN, "--save-every-n-batches", "0"], cwd=workdir)
    assert "--save-every-n-batches (LuminaAI) = --save-every-n-steps" in proc.stderr
    assert proc.returncode == 1 and "[E002]" in proc.stderr and "save_every_n_steps" in proc.stderr


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
    args = ["train", *FAST, "--train-data", TRAIN, "--tokenizer", str(path), "--max-steps", "2", "--experiment-name",
            "tok"]  # fmt: skip
    proc = here(args, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"model vocab 2048 -> {grown}" in proc.stdout
    assert "added them with new ids" in proc.stdout + proc.stderr
    chat = here(["chat", "--checkpoint", str(workdir / "runs" / "tok"), "--prompt", "hi", "--max-tokens", "4"],
                cwd=workdir)  # fmt: skip
    assert chat.returncode == 0, chat.stderr[-3000:]
