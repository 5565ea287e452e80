"""Saves that fit a pre-emption signal: by default (`--consolidate final`) only the run's last tag gets consolidated
weights; any other tag gets them from its DeepSpeed files when chat, export or --init-from first asks, equal to what
the save would have written; DeepSpeed's files are checksummed while written (never read back to list them);
`--save-every-minutes` saves on rank 0's clock; the run says how early a stop signal must come."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lumina_ds.config.run import CheckpointConfig
from lumina_ds.distributed.env import DistInfo
from lumina_ds.errors import CheckpointError, ConfigError
from lumina_ds.run_dir import COMPLETE_MARKER, WEIGHTS_FILE, list_complete_tags
from lumina_ds.training import checkpoint, checkpoint_files, elastic
from lumina_ds.training.checkpoint import CheckpointManager, PlainLoader
from lumina_ds.training.checkpoint_files import build_manifest, file_digest, file_problems, hashed_while_written
from lumina_ds.training.elastic import Layout
from lumina_ds.training.signal_lead import SIGNAL_LEAD_ENV, SignalLead
from lumina_ds.training.tag_weights import ensure_weights, writes_weights_later
from tests.runs import FAST, SHARED_STEPS, TRAIN, here

INFO = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))


def manifest(tag: Path) -> dict[str, dict[str, object]]:
    return dict(json.loads((tag / COMPLETE_MARKER).read_text())["files"])


def weights_removed(tag: Path) -> dict[str, torch.Tensor]:
    """The tag's consolidated weights as the save wrote them, then gone from the tag (its manifest still lists them:
    a tag saved with --consolidate final never had them, which ensure_weights cannot tell apart)."""
    original = load_file(str(tag / WEIGHTS_FILE))
    (tag / WEIGHTS_FILE).unlink()
    return original


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_only_the_last_tag_of_a_default_run_has_consolidated_weights(shared_run: Path) -> None:
    checkpoints = shared_run / "checkpoints"
    tags = list_complete_tags(checkpoints)
    assert len(tags) == SHARED_STEPS // 2
    assert [t for t in tags if (checkpoints / t / WEIGHTS_FILE).exists()] == [tags[-1]]
    last = checkpoints / tags[-1]
    assert manifest(last)[WEIGHTS_FILE]["size"] == (last / WEIGHTS_FILE).stat().st_size  # added to the manifest
    assert file_problems(last, manifest(last)) == []


def test_a_tag_gets_the_weights_its_save_would_have_written(copied_run: Path) -> None:
    """ZeRO-1, one rank: from DeepSpeed's model states, equal to the save's own consolidation."""
    last = copied_run / "checkpoints" / list_complete_tags(copied_run / "checkpoints")[-1]
    expected = weights_removed(last)
    assert ensure_weights(copied_run, log=lambda _: None) == last
    assert_same(load_file(str(last / WEIGHTS_FILE)), expected)
    assert file_problems(last, manifest(last)) == []
    assert not list((copied_run / "checkpoints").glob(".*weights*"))  # no staging dir or lock left behind


def test_zero3_bf16_weights_come_from_the_universal_conversion_exactly(
    workdir: Path, shared_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ZeRO-3 keeps no whole weight in its model states: the fp32 master weights of DeepSpeed's universal checkpoint,
    cast to bf16, are the module's bf16 weights bit for bit; the conversion made for it is removed after. A disk
    without room for the conversion is E303 before anything is written."""
    done = here(["train", *FAST, "--train-data", TRAIN, "--tokenizer", str(shared_run / "tokenizer.json"),
                 "--zero-stage", "3", "--precision", "bf16", "--max-steps", "2", "--save-every-n-steps", "2",
                 "--experiment-name", "z3bf16", "--consolidate", "every"], cwd=workdir)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    tag = workdir / "runs" / "z3bf16" / "checkpoints" / "step_00000002"
    expected = weights_removed(tag)
    assert {t.dtype for t in expected.values()} == {torch.bfloat16}
    with monkeypatch.context() as patch:
        patch.setattr(elastic.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1 << 40, 1 << 40, 1 << 20))
        with pytest.raises(CheckpointError, match=r"E303.*needs about .* GB .* 0\.00 GB are free"):
            ensure_weights(tag, log=lambda _: None)
    assert not (tag / WEIGHTS_FILE).exists() and not list((tag.parent / ".universal").iterdir())
    ensure_weights(tag, log=lambda _: None)
    assert_same(load_file(str(tag / WEIGHTS_FILE)), expected)
    assert not (tag.parent / ".universal" / tag.name).exists()


def test_chat_on_a_tag_without_weights_writes_them_first(copied_run: Path, workdir: Path) -> None:
    tag = copied_run / "checkpoints" / "step_00000004"
    assert not (tag / WEIGHTS_FILE).exists()
    done = here(["chat", "--checkpoint", str(tag), "--prompt", "hello", "--max-tokens", "2"], cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step_00000004 has no consolidated weights" in done.stdout
    assert WEIGHTS_FILE in manifest(tag) and file_problems(tag, manifest(tag)) == []


def test_deepspeed_files_are_checksummed_while_written(tmp_path: Path, process_group: DistInfo,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from types import SimpleNamespace

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    engine = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())
    with hashed_while_written(engine) as written:
        engine.checkpoint_engine.save({"w": torch.randn(300, 7), "step": 3}, str(tmp_path / "optim_states.pt"))
    (tmp_path / "trainer.json").write_text("{}")  # one of our own files: hashed by reading it
    read = []
    monkeypatch.setattr(checkpoint_files, "file_digest", lambda p: read.append(p.name) or file_digest(p))
    files = build_manifest(tmp_path, rank=0, world_size=1, written=written)
    assert read == ["trainer.json"]
    assert files["optim_states.pt"]["xxh3"] == file_digest(tmp_path / "optim_states.pt")
    assert file_problems(tmp_path, files) == []
    assert torch.load(tmp_path / "optim_states.pt")["w"].shape == (300, 7)


def test_save_every_minutes_follows_rank_0s_clock(tmp_path: Path, process_group: DistInfo,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    now = [1000.0]
    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: now[0])
    config = CheckpointConfig(save_every_n_steps=1000, save_every_minutes=2.5)
    manager = CheckpointManager(tmp_path, config, process_group, loader=PlainLoader(process_group))
    now[0] += 149.0
    assert not manager.due(7)
    now[0] += 1.0
    assert manager.due(7) and manager.due(1000)
    manager.last_save_at = now[0]
    assert not manager.due(8)


def test_consolidate_takes_final_every_or_never() -> None:
    with pytest.raises(ConfigError, match=r"E002.*consolidate"):
        CheckpointConfig(consolidate="sometimes").validate()
    with pytest.raises(ConfigError, match="E002"):
        CheckpointConfig(save_every_minutes=-1).validate()


def test_signal_lead_counts_the_slowest_step_after_the_first_and_the_save(monkeypatch: pytest.MonkeyPatch) -> None:
    lead = SignalLead()
    for seconds in (40.0, 3.0, 5.5, 4.0):  # the first step pays for warm-up
        lead.step_done(seconds)
    assert lead.needed(save_s=20.2) == 56  # 5.5 + 20.2 + 30, rounded up
    monkeypatch.setenv(SIGNAL_LEAD_ENV, "120")
    assert lead.advice(save_s=20.2).startswith("checkpoint saved in 20.2s: a stop signal must come at least 56s")
    monkeypatch.setenv(SIGNAL_LEAD_ENV, "45")
    advice = lead.advice(save_s=20.2)
    assert advice.startswith("warning: the stop signal comes 45s before the kill") and "USR1@56" in advice


@pytest.mark.parametrize(
    ("zero", "ep", "native", "nvme", "later"),
    [(0, 1, False, False, True), (0, 2, False, False, False), (1, 1, True, False, False), (2, 2, False, False, True),
     (3, 4, False, False, True), (3, 1, False, True, False)],
)  # fmt: skip
def test_layouts_without_an_offline_source_write_weights_at_every_save(
    tmp_path: Path, zero: int, ep: int, native: bool, nvme: bool, later: bool
) -> None:
    layout = Layout(2, ep, zero, native, micro_batch_size=1, grad_accum=1, swapped_to_nvme=nvme)
    assert writes_weights_later(layout) is later
    manager = CheckpointManager(tmp_path, CheckpointConfig(), INFO, loader=PlainLoader(INFO), weights_later=later)
    assert manager.weights_every_save is not later


def test_a_layout_without_an_offline_source_is_refused_and_the_tag_is_left_as_it_was(copied_run: Path) -> None:
    """A native-MoE tag without weights (saved with --consolidate never): DeepSpeed keeps its experts in files of
    their own that neither source reads; E303 names the layout and nothing is written."""
    tag = copied_run / "checkpoints" / "step_00000004"
    trainer_json = tag / "lumina_state" / "trainer.json"
    state = json.loads(trainer_json.read_text())
    state["config"]["distributed"]["moe_backend"] = "native"
    trainer_json.write_text(json.dumps(state))
    before = sorted(str(p.relative_to(tag)) for p in tag.rglob("*"))
    with pytest.raises(CheckpointError, match=r"E303.*the native MoE layer"):
        ensure_weights(tag, log=lambda _: None)
    assert sorted(str(p.relative_to(tag)) for p in tag.rglob("*")) == before
    assert not list(tag.parent.glob(".*weights*"))
