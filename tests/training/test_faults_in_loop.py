"""Faults inside training, in this process through the trainer, the train module and the checkpoints, with the
plain-torch engine of tests/training/fakes.py: poisoned steps (skip, rewind, E301), a crash between steps (emergency
checkpoint, exact resume), the guard's history across a resume, and a resume of an older tag. The same faults through
the command line and on two ranks are in tests/integration/test_divergence.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lumina_ds.config.run import GuardConfig
from lumina_ds.distributed.collectives import Arrival
from lumina_ds.errors import TrainingError
from lumina_ds.run_dir import list_complete_tags, tag_for_step
from lumina_ds.training.checkpoint import choose_resume_tag
from lumina_ds.training.checkpoint_state import load_trainer_state
from lumina_ds.training.trainer import Trainer
from tests.training.fakes import INFO, Recorder, make_trainer, resume

GUARD = GuardConfig(max_skips=2, window=10)
STEPS = 10


def fit(trainer: Trainer) -> Recorder:
    recorder = Recorder()
    trainer.callbacks.append(recorder)
    trainer.fit()
    return recorder


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The uninterrupted run the faulted ones are compared with: step -> loss."""
    run_dir = tmp_path_factory.mktemp("reference")
    return dict(fit(make_trainer(run_dir, total_steps=STEPS, guard=GUARD, save_every=4)).losses())


def test_poisoned_batches_are_skipped_then_rewound_past_and_left_out(
    tmp_path: Path, reference: dict[int, float], capsys: pytest.CaptureFixture[str]
) -> None:
    trainer = make_trainer(tmp_path, total_steps=STEPS, guard=GUARD, save_every=4, faults="nan_loss@6,nan_loss@7")
    logged = fit(trainer).losses()
    out = capsys.readouterr().out
    assert "warning: step 6 not applied: loss is nan (1 of 2 skips allowed in 10 steps)" in out
    assert "rewound to step 4 (step_00000004) after 2 skipped steps within 10 (steps [6, 7])" in out
    state = load_trainer_state(tmp_path / "checkpoints" / tag_for_step(STEPS))["trainer"]
    # steps 1-4, then 5 again from the checkpoint, the batches of steps 6 and 7 left out, steps 6-10 on data 8-12
    assert (state["data_steps"], state["left_out"], state["rewinds"], state["skipped_steps"]) == (12, [6, 7], 1, 2)
    assert [step for step, _ in logged] == [1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10]  # skipped steps log nothing
    # up to the rewind the run is the reference; step 5 replayed from the checkpoint is the same step again
    assert all(loss == pytest.approx(reference[step], abs=1e-6) for step, loss in logged[:6])
    assert logged[6][1] != pytest.approx(reference[6], abs=1e-6)  # step 6 now trains on data step 8


def test_a_run_that_keeps_diverging_stops_with_e301_and_saves_nothing_after_the_divergence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    guard = GuardConfig(max_skips=2, window=10, max_rewinds=1)
    trainer = make_trainer(tmp_path, total_steps=20, guard=guard, save_every=4, faults="spike_loss@6+")
    with pytest.raises(TrainingError) as err:
        trainer.fit()
    assert err.value.code == "E301" and "2 skipped steps within 10 (steps [6, 7]) after 1 rewind(s)" in str(err.value)
    out = capsys.readouterr().out
    assert out.count("rewound to step 4") == 1
    assert "no emergency checkpoint after TrainingError: the run diverged" in out
    assert list_complete_tags(tmp_path / "checkpoints") == ["step_00000004"]


def test_a_huge_learning_rate_ends_in_e301_not_in_checkpoints_of_a_dead_model(tmp_path: Path) -> None:
    """LuminaAI-style runs with --learning-rate 1e6 used to exit 0 with "complete" checkpoints of a loss of 2e18."""
    trainer = make_trainer(tmp_path, total_steps=60, guard=GuardConfig(), save_every=10, lr=1e6)
    with pytest.raises(TrainingError) as err:
        trainer.fit()
    assert err.value.code == "E301" and "no verified checkpoint to rewind to" in str(err.value)
    assert not list_complete_tags(tmp_path / "checkpoints")


def test_a_crash_between_steps_leaves_an_emergency_checkpoint_that_resumes_exactly(
    tmp_path: Path, reference: dict[int, float], capsys: pytest.CaptureFixture[str]
) -> None:
    crashed = make_trainer(tmp_path, total_steps=STEPS, guard=GUARD, faults="crash@5")
    with pytest.raises(RuntimeError, match="injected crash after step 5"):
        crashed.fit()
    assert "emergency checkpoint of step 5 saved after RuntimeError" in capsys.readouterr().out
    tag = choose_resume_tag(tmp_path, crashed.checkpoints.config.__class__(auto_resume=True), INFO, log=print)
    assert tag is not None and tag.name == tag_for_step(5)
    again = make_trainer(tmp_path, total_steps=STEPS, guard=GUARD, resume_from=tag)
    resume(again)
    after = fit(again).losses()
    assert [s for s, _ in after] == [6, 7, 8, 9, 10]
    assert all(loss == pytest.approx(reference[s], abs=1e-6) for s, loss in after)


def test_a_resumed_run_judges_its_steps_with_the_guards_saved_history(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The guard's window of recent losses and norms is part of the checkpoint: without it a resumed run applied a
    step the uninterrupted run skipped, and the two diverged (found by benchmarks/fault_drill.py)."""
    # a touchy norm test: most steps above the recent mean are skipped, so the history decides many steps
    touchy = GuardConfig(grad_norm_spike=1.01, window=4, max_skips=1000, min_history=2)
    full = fit(make_trainer(tmp_path / "full", total_steps=12, guard=touchy, save_every=4))
    skipped = {int(line.split()[2]) for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")}
    # resume from a tag with a skip within the 4 steps after it, which only a saved history can decide
    starts = [t for t in (8, 4) if skipped & set(range(t + 1, t + 5))]
    assert starts, f"no skip right after a checkpoint: {skipped}"
    tag = tmp_path / "full" / "checkpoints" / tag_for_step(starts[0])
    again = make_trainer(tmp_path / "resumed", total_steps=12, guard=touchy, save_every=4, resume_from=tag)
    resume(again)
    after = fit(again).losses()
    resumed_skips = {int(line.split()[2]) for line in capsys.readouterr().out.splitlines()
                     if line.startswith("warning: ")}  # fmt: skip
    assert resumed_skips == {s for s in skipped if s > starts[0]}
    expected = dict(full.losses())
    assert after and all(math.isclose(loss, expected[step], abs_tol=1e-6) for step, loss in after)


def test_resuming_an_older_tag_sets_the_newer_ones_aside_so_rotation_and_auto_resume_follow_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by benchmarks/fault_drill.py: after `--resume` of an older tag, rotation (newest by step number) deleted
    the new continuation's tags at once, and a later --auto-resume went back to the abandoned ones."""
    make_trainer(tmp_path, total_steps=8, save_every=2, save_total_limit=2).fit()  # tags 6, 8
    checkpoints = tmp_path / "checkpoints"
    older = make_trainer(tmp_path, total_steps=7, save_every=2, save_total_limit=2,
                         resume_from=checkpoints / tag_for_step(6))  # fmt: skip
    resume(older)
    older.fit()
    assert "resumed from step_00000006, older than step_00000008" in capsys.readouterr().out
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000006", "step_00000007"]
    (aside,) = (checkpoints / "abandoned").iterdir()
    assert [p.name for p in aside.iterdir()] == ["step_00000008"]
    config = older.checkpoints.config.__class__(auto_resume=True)
    tag = choose_resume_tag(tmp_path, config, INFO, log=print)
    assert tag is not None and tag.name == "step_00000007"


# gloo's errors of rank 0's wait on the control group (torch 2.13): rank 1's process ended 1 s into the wait, and the
# wait ran out; both say "failed to pass monitoredBarrier in 60000 ms"
PEER_GONE = ("[Rank 0]: Rank 1 failed to pass monitoredBarrier in 60000 ms\n Original exception: \n"
             "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:34180. "
             "This is typically caused by a remote worker crashing.")  # fmt: skip
TIMED_OUT = ("[Rank 0]: Rank 1 failed to pass monitoredBarrier in 60000 ms\n Original exception: \n"
             "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 60000ms for recv "
             "operation to complete")  # fmt: skip


@pytest.mark.parametrize(
    ("error", "seconds", "said"),
    [
        (PEER_GONE, 1.2, "rank 1 did not reach it: the wait failed after 1.2 s of the 60 s allowed "
                         "(Connection closed by peer [127.0.0.1]:34180)"),
        (TIMED_OUT, 60.01, "rank 1 did not reach it within 60 s (the error was not on every rank)"),
    ],
)  # fmt: skip
def test_an_emergency_checkpoint_a_rank_never_reaches_says_how_the_wait_ended(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    error: str, seconds: float, said: str,
) -> None:  # fmt: skip
    """A wait that a gone rank's closed connection cut short after a second was reported as 60 s run out."""
    from lumina_ds.distributed.collectives import failed_arrival

    def arrival(*, timeout_s: float) -> Arrival:
        assert timeout_s == 60
        return failed_arrival(error, seconds=seconds, timeout_s=timeout_s)

    monkeypatch.setattr("lumina_ds.training.trainer.all_ranks_arrive", arrival)
    trainer = make_trainer(tmp_path, total_steps=STEPS, faults="crash@3")
    with pytest.raises(RuntimeError, match="injected crash after step 3"):
        trainer.fit()
    assert f"no emergency checkpoint after RuntimeError: {said}\n" in capsys.readouterr().out
    assert not list_complete_tags(tmp_path / "checkpoints")
