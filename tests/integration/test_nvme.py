"""ZeRO-Infinity on the CPU accelerator: optimizer states and parameters swapped to NVMe files through DeepSpeed's
AsyncIO op (libaio; `make test-nvme` builds the op and runs these tests: its first build takes minutes) train exactly
like ZeRO-Offload to host memory, in a swap directory of the run's own that is gone when the run ends, and a
checkpoint resumes exactly.

Two ranks, because one CPU process cannot hold parameters on NVMe (E003: DeepSpeed's gather is then the swap buffer
itself, reused before backward reads it). The debug preset is widened to hidden 256 and expert FFN 512 so that its
embedding and expert weights reach DeepSpeed's 1 MiB swap floor per rank (half of 2048 x 256 fp32), as the optimizer's
sub-group of 2-D weights does; its norms stay below it, in host memory, which is what resuming must also restore."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lumina_ds.training.tag_weights import ensure_weights
from tests.runs import FAST, TRAIN, here, losses, ranks, start_ranks

pytestmark = [pytest.mark.slow, pytest.mark.nvme]

WIDE_DEBUG = "preset: debug\nmodel:\n  hidden_size: 256\n  moe:\n    expert_intermediate_size: 512\n"
STEPS = 20


@dataclass
class Runs:
    root: Path
    nvme: Path  # --nvme-path
    cpu: Path  # ZeRO-Offload to host memory
    swapped: Path  # the same run on NVMe
    resumed: Path  # from its step-10 checkpoint, on NVMe
    seen: set[str]  # swap files under --nvme-path while `swapped` ran (relative paths)


def argv(root: Path, name: str, *extra: str) -> list[str]:
    return ["train", "--config-file", str(root / "debug_wide.yaml"), *FAST[2:], "--train-data", TRAIN,
            "--zero-stage", "3", "--offload", "optimizer+params", "--precision", "fp32", "--max-steps", str(STEPS),
            "--save-every-n-steps", "10", "--no-progress-bar", "--no-tensorboard", "--experiment-name", name,
            *extra]  # fmt: skip


def watched(root: Path, args: list[str], nvme: Path) -> set[str]:
    """Run two ranks and collect the swap files that exist under `nvme` while they run."""
    group, seen = start_ranks(args, cwd=root), set()
    while any(p.is_alive() for p in group.processes):
        seen.update(str(path.relative_to(nvme)) for path in nvme.rglob("*.swp"))
        time.sleep(0.05)
    done = group.wait()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return seen


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("nvme_runs")
    (root / "debug_wide.yaml").write_text(WIDE_DEBUG)
    nvme = root / "nvme"
    nvme.mkdir()
    cpu = ranks(argv(root, "cpu"), cwd=root)
    assert cpu.returncode == 0, cpu.stdout[-2000:] + cpu.stderr[-4000:]
    on_nvme = ["--tokenizer", str(root / "runs" / "cpu" / "tokenizer.json"), "--offload-device", "nvme",
               "--nvme-path", str(nvme)]  # fmt: skip
    seen = watched(root, argv(root, "swapped", *on_nvme), nvme)
    tag = root / "runs" / "swapped" / "checkpoints" / "step_00000010"
    resumed = ranks(argv(root, "resumed", *on_nvme, "--resume", str(tag)), cwd=root)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    runs_dir = root / "runs"
    return Runs(root, nvme, runs_dir / "cpu", runs_dir / "swapped", runs_dir / "resumed", seen)


def assert_same_losses(got: dict[int, float], expected: dict[int, float], steps: range) -> None:
    assert sorted(got) == list(steps), sorted(got)
    assert all(math.isclose(got[s], expected[s], abs_tol=1e-5) for s in steps), (got, expected)


def test_nvme_offload_trains_like_offload_to_host_memory(runs: Runs) -> None:
    assert_same_losses(losses(runs.swapped), losses(runs.cpu), range(1, STEPS + 1))
    tag = "checkpoints/step_00000010/model.safetensors"
    # an NVMe-swapped run writes its weights at every save (they have no other source); the host-memory run's tag of
    # step 10 is not its last: its weights are written now from its DeepSpeed files, as chat and export do
    ensure_weights(runs.cpu / "checkpoints" / "step_00000010", log=lambda _: None)
    weights, reference = load_file(runs.swapped / tag), load_file(runs.cpu / tag)
    assert weights.keys() == reference.keys()
    assert all((weights[k] - reference[k]).abs().max() <= 1e-6 for k in weights)
    ds = json.loads((runs.swapped / "ds_config.json").read_text())
    param, optimizer = ds["zero_optimization"]["offload_param"], ds["zero_optimization"]["offload_optimizer"]
    assert param["device"] == optimizer["device"] == "nvme" and param["max_in_cpu"] == 0
    assert Path(param["nvme_path"]).parent.parent == runs.nvme  # <nvme>/swapped-<token>/rank0
    assert Path(param["nvme_path"]).parent.name.startswith("swapped-") and ds["aio"]["block_size"] == 1 << 20


def test_swap_files_are_written_in_the_runs_own_directory_and_removed_at_the_end(runs: Runs) -> None:
    run_dirs = {path.split("/")[0] for path in runs.seen}
    assert len(run_dirs) == 1 and run_dirs.pop().startswith("swapped-"), runs.seen
    for rank in (0, 1):
        mine = [p.split("/", 1)[1] for p in runs.seen if f"/rank{rank}/zero_stage_3/" in p]
        assert any(p.startswith(f"rank{rank}/zero_stage_3/float32params/rank{rank}/") for p in mine), mine
        assert any(f"/optimizer/rank{rank}/exp_avg-" in p for p in mine), mine
    assert list(runs.nvme.iterdir()) == []  # after the swapped run and after the resumed one
    offloaded = runs.swapped / "checkpoints" / "step_00000010" / "offloaded_tensors"
    assert sorted(p.name for p in offloaded.iterdir()) == ["rank00", "rank01"]


def test_a_checkpoint_taken_on_nvme_resumes_exactly(runs: Runs) -> None:
    assert_same_losses(losses(runs.resumed), losses(runs.swapped), range(11, STEPS + 1))


def test_one_cpu_process_cannot_hold_parameters_on_nvme(runs: Runs) -> None:
    args = argv(runs.root, "single", "--offload-device", "nvme", "--nvme-path", str(runs.nvme))
    done = here(args, cwd=runs.root)
    assert done.returncode != 0 and "[E003] NVMe parameter offload needs 2 or more processes" in done.stderr
    assert list(runs.nvme.iterdir()) == []
