"""A resume checks what it resumes before anything in the run directory changes: the architecture (field by field,
with the flag), the tokenizer the tag was trained with (restored from the tag when the run's copy is gone or
unreadable, never retrained), the data's content; a refusal leaves config.yaml, the tokenizer and every tag as they
were. Through the command line a user types, on copies of the shared run (tags every 2 steps up to 12)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lumina_ds.tokenizer import ChatTokenizer, train_bpe_tokenizer
from tests.runs import FAST, TRAIN, here, read_metrics

TAGS = [f"step_{step:08d}" for step in range(2, 13, 2)]


def snapshot(run_dir: Path) -> dict[str, bytes | list[str]]:
    """What a refused resume must leave as it was: the run's files and its tags."""
    files = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "tokenizer.json", "ds_config.json")}
    return {**files, "tags": sorted(p.name for p in (run_dir / "checkpoints").iterdir())}


def resume_args(*extra: str, data: str = TRAIN) -> list[str]:
    return ["train", *FAST, "--train-data", data, "--experiment-name", "shared", "--max-steps", "14", *extra]


def test_a_refused_architecture_names_each_field_and_flag_and_changes_nothing(copied_run: Path, workdir: Path) -> None:
    before = snapshot(copied_run)
    refused = here(resume_args("--auto-resume", "--num-experts", "8", "--top-k", "1"), cwd=workdir)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "[E303] checkpoint step_00000012 was trained with another model architecture" in refused.stderr
    assert "model.moe.num_experts 4 -> 8 (--num-experts)" in refused.stderr
    assert "model.moe.top_k 2 -> 1 (--top-k)" in refused.stderr
    assert "load_state_dict" not in refused.stderr and "earlier tag" not in refused.stderr
    # an older tag, with newer ones beside it: refused before any of them moves to checkpoints/abandoned
    older = here(resume_args("--resume", str(copied_run / "checkpoints" / TAGS[3]), "--top-k", "1"), cwd=workdir)
    assert older.returncode == 1 and "model.moe.top_k 2 -> 1 (--top-k)" in older.stderr
    assert snapshot(copied_run) == before
    resumed = here(resume_args("--auto-resume"), cwd=workdir)  # the next correct resume continues from step 12
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 12" in resumed.stdout
    assert [r["step"] for r in read_metrics(copied_run)[0]][-3:] == [12, 13, 14]


def test_a_tokenizer_other_than_the_tags_is_refused_naming_both(copied_run: Path, workdir: Path) -> None:
    other = workdir / "other" / "tokenizer.json"
    train_bpe_tokenizer(["a smaller vocabulary of other text"] * 50, vocab_size=300).save(other)
    before = snapshot(copied_run)
    refused = here(resume_args("--auto-resume", "--tokenizer", str(other)), cwd=workdir)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    trained = ChatTokenizer.from_file(copied_run / "tokenizer.json")
    theirs = ChatTokenizer.from_file(other)
    assert "[E303] checkpoint step_00000012 was trained with another tokenizer" in refused.stderr
    assert f"vocab {trained.vocab_size:,}" in refused.stderr and f"vocab {theirs.vocab_size:,}" in refused.stderr
    assert f"--tokenizer runs/shared/checkpoints/{TAGS[-1]}/lumina_state/tokenizer/tokenizer.json" in refused.stderr
    assert snapshot(copied_run) == before


def test_a_missing_or_unreadable_tokenizer_comes_back_from_the_tag(copied_run: Path, workdir: Path) -> None:
    own = copied_run / "tokenizer.json"
    trained = ChatTokenizer.from_file(own).identity()
    own.unlink()
    resumed = here(resume_args("--auto-resume", "--max-steps", "13"), cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "is missing: using step_00000012's tokenizer" in resumed.stdout
    assert "trained a byte-level BPE" not in resumed.stdout
    assert ChatTokenizer.from_file(own).identity() == trained
    truncated = own.read_bytes()[:1000]
    own.write_bytes(truncated)
    again = here(resume_args("--auto-resume"), cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "warning: runs/shared/tokenizer.json cannot be read" in again.stdout, again.stdout
    assert ChatTokenizer.from_file(own).identity() == trained
    assert [p.read_bytes() for p in copied_run.glob("tokenizer.json.replaced-*")] == [truncated]  # kept, not lost


def test_an_unreadable_tokenizer_with_no_checkpoint_is_e115(workdir: Path) -> None:
    run_dir = workdir / "runs" / "fresh"
    run_dir.mkdir(parents=True)
    (run_dir / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    refused = here(["train", *FAST, "--train-data", TRAIN, "--experiment-name", "fresh", "--max-steps", "2"],
                   cwd=workdir)  # fmt: skip
    assert refused.returncode == 1 and "[E115]" in refused.stderr and "Traceback" not in refused.stderr
    assert "delete runs/fresh/tokenizer.json to train a new tokenizer" in refused.stderr
    assert (run_dir / "tokenizer.json").read_text() == '{"version": "1.0", "trunc'


def test_data_edited_in_place_is_e107_naming_the_file_unless_allowed(copied_run: Path, workdir: Path) -> None:
    lines = Path(TRAIN).read_text().splitlines(keepends=True)
    edited = workdir / "edited.jsonl"
    swapped = [line.replace('"content": "', '"content": "Edited. ', 1) for line in lines[:50]]
    edited.write_text("".join(swapped + lines[50:]))  # the same number of lines
    before = snapshot(copied_run)
    older = str(copied_run / "checkpoints" / TAGS[3])
    refused = here(resume_args("--resume", older, data=str(edited)), cwd=workdir)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "[E107] the training data changed since the checkpoint" in refused.stderr
    assert f"{edited} differs from the checkpoint's {TRAIN}" in refused.stderr
    assert "--allow-changed-data" in refused.stderr
    assert snapshot(copied_run) == before
    moved = workdir / "moved.jsonl"  # the same content under another name is the same data
    shutil.copyfile(TRAIN, moved)
    same = here(resume_args("--auto-resume", "--max-steps", "13", data=str(moved)), cwd=workdir)
    assert same.returncode == 0, same.stderr[-3000:]
    allowed = here(resume_args("--auto-resume", "--allow-changed-data", data=str(edited)), cwd=workdir)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "warning: --allow-changed-data: the data changed since the checkpoint" in allowed.stdout
    assert "at step 13" in allowed.stdout


def test_an_unreadable_complete_json_falls_back_to_the_previous_tag(copied_run: Path, workdir: Path) -> None:
    newest = copied_run / "checkpoints" / TAGS[-1]
    (newest / "complete.json").write_text('{"step": 12, "files": {"model.safe')  # cut mid-write by a bad disk
    chat = here(["chat", "--checkpoint", str(copied_run), "--prompt", "hi", "--max-tokens", "2"], cwd=workdir)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert f"warning: {newest / 'complete.json'} is unreadable: using the previous tag" in chat.stderr
    named = here(["export", str(newest), "--output", str(workdir / "hf")], cwd=workdir)
    assert named.returncode == 1 and "[E303]" in named.stderr and "unreadable complete.json" in named.stderr
    resumed = here(resume_args("--auto-resume", "--max-steps", "11"), cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint step_00000012 fails verification (complete.json is unreadable" in resumed.stdout
    assert "at step 10" in resumed.stdout


def test_each_tag_records_the_tokenizer_it_was_trained_with(shared_run: Path) -> None:
    trained = ChatTokenizer.from_file(shared_run / "tokenizer.json")
    for tag in TAGS:
        state = json.loads((shared_run / "checkpoints" / tag / "lumina_state" / "trainer.json").read_text())
        assert state["tokenizer"]["identity"] == trained.identity()
        assert state["tokenizer"]["vocab_size"] == trained.vocab_size
        manifest = json.loads((shared_run / "checkpoints" / tag / "complete.json").read_text())["files"]
        assert "lumina_state/tokenizer/tokenizer.json" in manifest  # checksummed with the tag


def test_the_flag_named_for_each_model_field_is_the_flag_that_sets_it() -> None:
    from lumina_ds.cli.train_flags import FLAG_GROUPS
    from lumina_ds.training.resume_checks import MODEL_FLAGS

    flags = [flag for group in FLAG_GROUPS.values() for flag in group]
    setting = {f.target.removeprefix("model."): f.names[0] for f in flags if f.target.startswith("model.")}
    assert setting == MODEL_FLAGS
