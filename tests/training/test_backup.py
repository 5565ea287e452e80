"""Backups (--backup-dir): copied in the background, verified against the tag's manifest, removed when the copy is
bad, kept out of rotation while copying, never a reason for training to stop; and a backup resumes like a tag."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from lumina_ds.config.run import CheckpointConfig, RunConfig
from lumina_ds.errors import ConfigError
from lumina_ds.run_dir import COMPLETE_MARKER, list_complete_tags, resolve_checkpoint, tag_for_step
from lumina_ds.tokenizer import ChatTokenizer
from lumina_ds.training import backup
from lumina_ds.training.backup import BackupCopier, rotate_backups
from lumina_ds.training.checkpoint import CheckpointManager, PlainLoader, first_verified, resume_candidates
from lumina_ds.training.checkpoint_files import build_manifest, check_files
from tests.training.fakes import INFO, STATE_FILE, FakeEngine


def manager_with_backups(tmp_path: Path, **options: object) -> CheckpointManager:
    options.setdefault("consolidate", "every")  # tags with weights: the largest file a copy can get wrong
    config = CheckpointConfig(backup_dir=str(tmp_path / "backup"), **options)  # type: ignore[arg-type]
    (tmp_path / "demo").mkdir(exist_ok=True)  # the run dir exists before any save
    return CheckpointManager(tmp_path / "demo", config, INFO, loader=PlainLoader(INFO))


def save(manager: CheckpointManager, step: int, *, best: int | None = None) -> Path:
    """A real save (manifest, atomic install, rotation, backup hook) of a small model with a fake engine."""
    torch.manual_seed(step)
    engine = FakeEngine(torch.nn.Linear(64, 64))
    state = {"trainer": {"step": step}, "module": {}, "config": {}}
    return manager.save(engine, step, state=state, data={"index": step}, keep_step=best)


def test_a_backup_is_verified_and_resumes_after_the_run_checkpoints_are_gone(tmp_path: Path) -> None:
    manager = manager_with_backups(tmp_path)
    (tmp_path / "demo" / "tokenizer.json").write_text('{"vocab": 1}')
    (tmp_path / "demo" / "chat_template.jinja").write_text("{{ messages }}")  # an imported model's template
    tag = save(manager, 4)
    manager.wait_for_backup()
    copy = tmp_path / "backup" / "demo" / tag.name
    meta = json.loads((copy / COMPLETE_MARKER).read_text())
    assert set(meta["files"]) == {"model.safetensors", "lumina_state/rank00000.json", "lumina_state/trainer.json",
                                  STATE_FILE}  # fmt: skip
    assert check_files(copy, meta["files"], rank=0, world_size=1) is None
    assert (copy.parent / "tokenizer.json").read_text() == '{"vocab": 1}'  # beside the tags, as in a run dir
    assert (copy.parent / "chat_template.jinja").read_text() == "{{ messages }}"
    assert not (copy.parent / "tokenizer_config.json").exists()  # the run has none
    assert [p.name for p in copy.parent.iterdir() if p.name.startswith(".")] == []  # no staging left
    for path in manager.dir.rglob("*"):  # the run's own checkpoints are lost
        if path.is_file():
            path.unlink()
    assert resume_candidates(tmp_path / "other", CheckpointConfig(resume=str(copy))) == [copy]
    assert first_verified([copy], INFO, strict=True, log=print) == copy
    assert resolve_checkpoint(copy.parent) == (copy.parent, tag.name)


def test_the_run_files_reach_the_backup_before_its_first_tag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill right after the first backup tag lands must leave a backup that chat and resume can use."""
    manager = manager_with_backups(tmp_path)
    for name in ("config.yaml", "tokenizer.json"):
        (tmp_path / "demo" / name).write_text(name)
    present_at_copy: list[list[str]] = []
    real_copy_tag = backup.copy_tag

    def copy_tag(tag_dir: Path, root: Path) -> int:
        present_at_copy.append(sorted(p.name for p in root.iterdir()))
        return real_copy_tag(tag_dir, root)

    monkeypatch.setattr(backup, "copy_tag", copy_tag)
    save(manager, 2)
    manager.wait_for_backup()
    assert present_at_copy == [["config.yaml", "tokenizer.json"]]


def flip_a_byte_of(victim: str) -> object:
    def corrupting_copy(src: Path, dst: Path) -> None:
        data = bytearray(src.read_bytes())
        if src.name == victim:
            data[len(data) // 2] ^= 0x01  # one bit in the middle, as a bad disk or cable would
        dst.write_bytes(bytes(data))

    return corrupting_copy


def test_a_copy_that_does_not_match_is_removed_with_a_warning_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    manager = manager_with_backups(tmp_path)
    monkeypatch.setattr(backup, "copy_file", flip_a_byte_of("model.safetensors"))
    tag = save(manager, 2)
    manager.wait_for_backup()
    err = capsys.readouterr().err
    assert "warning: backup of step_00000002" in err and "model.safetensors does not match its checksum" in err
    assert len(err.strip().splitlines()) == 1
    assert list((tmp_path / "backup" / "demo").iterdir()) == []  # neither the bad copy nor its staging dir
    assert check_files(tag, json.loads((tag / COMPLETE_MARKER).read_text())["files"], rank=0, world_size=1) is None


def test_a_full_backup_disk_warns_and_removes_the_partial_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    copied: list[str] = []

    def fills_up(src: Path, dst: Path) -> None:
        if copied:
            raise OSError(28, "No space left on device")
        copied.append(src.name)
        dst.write_bytes(src.read_bytes())

    monkeypatch.setattr(backup, "copy_file", fills_up)
    manager = manager_with_backups(tmp_path)
    save(manager, 2)
    manager.wait_for_backup()
    err = capsys.readouterr().err
    assert "failed (lumina_state/rank00000.json: No space left on device)" in err  # the second file copied
    assert list((tmp_path / "backup" / "demo").iterdir()) == []
    assert list_complete_tags(manager.dir) == ["step_00000002"]


def test_rotation_keeps_the_tag_being_copied_until_its_copy_is_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release, started = threading.Event(), threading.Event()
    real_copy = backup.copy_file

    def slow_copy(src: Path, dst: Path) -> None:
        started.set()
        assert release.wait(timeout=60)
        real_copy(src, dst)

    monkeypatch.setattr(backup, "copy_file", slow_copy)
    manager = manager_with_backups(tmp_path, save_total_limit=1)
    first = save(manager, 1)
    assert started.wait(timeout=60)
    for step in (2, 3, 4):  # each save rotates; step 1 is the oldest and over the limit of 1
        save(manager, step)
    assert list_complete_tags(manager.dir) == [tag_for_step(1), tag_for_step(4)]
    release.set()
    manager.wait_for_backup()
    assert list_complete_tags(tmp_path / "backup" / "demo") == [first.name]  # 2-4 were saved while it copied
    manager.rotate()
    assert list_complete_tags(manager.dir) == [tag_for_step(4)]  # verified: step 1 may go now


def test_an_unwritable_backup_dir_warns_at_each_save_and_saving_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the backup dir should be")  # unwritable even for root
    config = CheckpointConfig(save_total_limit=2, backup_dir=str(blocker / "backups"))
    (tmp_path / "demo").mkdir()
    manager = CheckpointManager(tmp_path / "demo", config, INFO, loader=PlainLoader(INFO))
    for step in (2, 4, 6):  # what the loop does: save, train on, save again
        save(manager, step)
        manager.wait_for_backup()
    assert list_complete_tags(manager.dir) == [tag_for_step(4), tag_for_step(6)]
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 3 and all("the backup directory: Not a directory" in line for line in warnings), warnings


def test_backups_follow_the_hours_since_the_last_one_across_restarts(tmp_path: Path) -> None:
    manager = manager_with_backups(tmp_path, backup_every_n_hours=1.0)
    save(manager, 1)
    manager.wait_for_backup()
    save(manager, 2)  # within the hour: not copied
    manager.wait_for_backup()
    root = tmp_path / "backup" / "demo"
    assert list_complete_tags(root) == [tag_for_step(1)]
    restarted = manager_with_backups(tmp_path, backup_every_n_hours=1.0)  # the cadence survives a restart
    assert restarted.backups is not None
    last = (root / tag_for_step(1) / COMPLETE_MARKER).stat().st_mtime
    assert not restarted.backups.due(last + 3599) and restarted.backups.due(last + 3600)


def make_backup(root: Path, step: int, *, saved: float) -> None:
    tag = root / tag_for_step(step)
    tag.mkdir(parents=True)
    (tag / COMPLETE_MARKER).write_text(json.dumps({"step": step, "time": saved, "files": {}}))


def test_backup_rotation_keeps_the_newest_saves_and_the_best(tmp_path: Path) -> None:
    """By save time, not step: a run resumed from step 6 keeps its new tags over an abandoned lineage's 10 and 12."""
    for step, saved in ((2, 1.0), (10, 2.0), (12, 3.0), (8, 4.0), (6, 5.0)):
        make_backup(tmp_path, step, saved=saved)
    removed = rotate_backups(tmp_path, keep=2, best_step=10)
    assert sorted(removed) == [tag_for_step(2), tag_for_step(12)]
    assert list_complete_tags(tmp_path) == [tag_for_step(6), tag_for_step(8), tag_for_step(10)]


def test_a_stale_staging_dir_of_a_killed_copy_is_removed_by_the_next_backup(tmp_path: Path) -> None:
    root = tmp_path / "backup" / "demo"
    stale = root / ".step_00000001.backup-123-abcd"
    stale.mkdir(parents=True)
    (stale / "half.pt").write_bytes(os.urandom(16))
    manager = manager_with_backups(tmp_path)
    save(manager, 2)
    manager.wait_for_backup()
    assert sorted(p.name for p in root.iterdir()) == [tag_for_step(2)]


def test_a_backup_of_a_tag_saved_before_manifests_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tag = tmp_path / "checkpoints" / tag_for_step(3)
    tag.mkdir(parents=True)
    (tag / "weights.bin").write_bytes(os.urandom(64))
    (tag / COMPLETE_MARKER).write_text(json.dumps({"step": 3, "world_size": 1}))
    copier = BackupCopier(root=tmp_path / "backup", run_dir=tmp_path, every_hours=0.0, keep=2)
    copier.after_install(tag, best_step=None)
    copier.wait()
    assert "lists no files to verify a copy against" in capsys.readouterr().err
    assert not (tmp_path / "backup" / tag.name).exists()
    assert build_manifest(tag, rank=0, world_size=1)  # the tag itself is untouched


def test_a_backup_dir_that_is_the_output_dir_is_refused() -> None:
    run = RunConfig()
    run.checkpoint.backup_dir = run.logging.output_dir
    with pytest.raises(ConfigError, match="would land in the run directory"):
        run.validate()
    run.checkpoint.backup_dir, run.checkpoint.backup_every_n_hours = "elsewhere", -1.0
    with pytest.raises(ConfigError, match="backup_every_n_hours"):
        run.validate()


def test_the_cli_backs_up_and_resumes_from_a_backup_when_the_run_checkpoints_are_lost(tmp_path: Path) -> None:
    """The one end-to-end run: a backup is a tag like any other for --resume, and a run dir for chat."""
    from tests.runs import FAST, TRAIN, here, read_metrics

    backups = tmp_path / "backup"
    base = ["train", *FAST, "--train-data", TRAIN, "--experiment-name", "a", "--save-every-n-steps", "2",
            "--max-steps", "6", "--backup-dir", str(backups), "--no-progress-bar"]  # fmt: skip
    first = here(base, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"backup: step_00000006 -> {backups / 'a' / 'step_00000006'} verified" in first.stdout
    assert sorted(p.name for p in (backups / "a").iterdir()) == ["config.yaml", "step_00000004", "step_00000006",
                                                                  "tokenizer.json"]  # fmt: skip
    assert "model.safetensors" in json.loads((backups / "a" / "step_00000006" / COMPLETE_MARKER).read_text())["files"]
    assert not (backups / "a" / "step_00000004" / "model.safetensors").exists()  # the last tag's weights only
    saved_before = json.loads((backups / "a" / "step_00000006" / COMPLETE_MARKER).read_text())["time"]
    trained_with = ChatTokenizer.from_file(tmp_path / "runs" / "a" / "tokenizer.json").identity()
    first_logs, _ = read_metrics(tmp_path / "runs" / "a")
    shutil.rmtree(tmp_path / "runs" / "a")  # the run's own disk is lost: its tokenizer and config with it
    resumed = here([*base, "--resume", str(backups / "a" / "step_00000004")], cwd=tmp_path)
    assert resumed.returncode == 0 and f"resumed from {backups / 'a' / 'step_00000004'} at step 4" in resumed.stdout
    assert "step_00000004's tokenizer" in resumed.stdout and "trained a byte-level BPE" not in resumed.stdout
    assert ChatTokenizer.from_file(tmp_path / "runs" / "a" / "tokenizer.json").identity() == trained_with
    logs, _ = read_metrics(tmp_path / "runs" / "a")
    assert [r["step"] for r in logs] == [5, 6]  # the same steps on the same tokens as the first run's
    assert [r["loss"] for r in logs] == pytest.approx([r["loss"] for r in first_logs[4:6]], abs=1e-6)
    # the resumed run's step 6 replaced the old one in the backup dir
    assert json.loads((backups / "a" / "step_00000006" / COMPLETE_MARKER).read_text())["time"] > saved_before
    chat = here(["chat", "--checkpoint", str(backups / "a"), "--prompt", "hi", "--max-tokens", "4"], cwd=tmp_path)
    assert chat.returncode == 0
