"""DeepSpeed's universal checkpoint for elastic resume: a tag converted once (by rank 0, in a subprocess that unpickles
nothing but tensors), verified and reused, and loaded into an engine of another world size or expert-parallel size.

What the load adapts, each checked against DeepSpeed 0.19.8:
- names: below expert-parallel size 2 our own MoE block runs (router `ffn.gate`, shared experts `ffn.shared`), above it
  AutoEP's layer (`ffn.router.gate`, `ffn.shared_experts`); the universal folders of one are found for the other.
- expert tensors: the converter marks AutoEP experts `is_expert_param` (the target slices them by expert-parallel rank)
  and writes our block's ZeRO-3 experts flat; the marks follow the target (ZeRO-3 refuses a marked tensor in a plain
  parameter) and a flat tensor gets its [experts, ...] shape back.
- optimizer param groups: ZeRO-1/2 load the groups pairwise with the saved ones (zip: a missing saved group leaves the
  target's expert group unloaded), and ZeRO-1/2/3 copy the saved groups' settings, names included, over the target's
  (ZeRO-3 copies group 0's into every group, weight decay too); the saved groups are padded to the target's number and
  every group gets its own settings back after the load, with the restored learning rate.
- the LR scheduler's per-group lists follow the target's number of groups.
- ZeRO-3 restores one step-counter tensor into every sub-group's state; AdamW advances it in place once per
  sub-group, so the second sub-group (the norms) would step with a wrong bias correction: each gets its own copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lumina_ds.errors import CheckpointError
from lumina_ds.run_dir import COMPLETE_MARKER
from lumina_ds.training.checkpoint_files import file_digest, tag_files, weights_only_loads
from lumina_ds.training.engine import Engine

MARKER = "lumina_universal.json"
EXPERT_WEIGHT = re.compile(r"layers\.\d+\.ffn\.experts\.w[123]")
MMAP_LOADS = True  # benchmarks/universal_scaling.py turns it off to measure the reads without
CONVERT_WORKERS = 2  # DeepSpeed's extract/merge processes (forked: they inherit the weights-only loads)


def canonical(name: str) -> str:
    """A parameter's name in our own MoE block's terms (AutoEP's router and shared experts renamed)."""
    return name.replace(".ffn.router.gate.", ".ffn.gate.").replace(".ffn.shared_experts.", ".ffn.shared.")


# ---- conversion ---------------------------------------------------------------------------------------------------
def _source_digest(tag_dir: Path) -> str:
    """The tag's complete.json lists every file's checksum: its own checksum identifies the whole tag."""
    return file_digest(tag_dir / COMPLETE_MARKER)


def _deepspeed_version() -> str:
    import deepspeed

    return str(deepspeed.__version__)


def reusable(target: Path, tag_dir: Path) -> str | None:
    """Why an existing conversion cannot be reused (None when it can): another source or DeepSpeed, or a file that
    does not match the checksums written after the conversion."""
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return "no verified conversion"
    if marker.get("source") != str(tag_dir.resolve()) or marker.get("source_digest") != _source_digest(tag_dir):
        return "converted from another checkpoint"
    if marker.get("deepspeed") != _deepspeed_version():
        return "converted by another DeepSpeed version"
    for name, expected in marker["files"].items():
        path = target / name
        if not path.is_file() or path.stat().st_size != expected["size"] or file_digest(path) != expected["xxh3"]:
            return f"{name} does not match its checksum"
    return None


def staging(target: Path) -> Path:
    """Where a conversion is built, at the same path on every rank (the ranks write into it together)."""
    return target.parent / f".{target.name}.converting"


def prepare(target: Path) -> None:
    """Rank 0, before any rank converts: an empty staging folder."""
    shutil.rmtree(staging(target), ignore_errors=True)
    (staging(target) / target.name).mkdir(parents=True)


def _refused(tag_dir: Path, done: subprocess.CompletedProcess[str]) -> CheckpointError:
    lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
    return CheckpointError(
        "E303",
        f"DeepSpeed could not convert {tag_dir} to a universal checkpoint: {lines[-1] if lines else '?'}",
        "resume on the number of processes and expert-parallel size that saved it",
    )


def convert_share(tag_dir: Path, target: Path, *, rank: int, world: int) -> bool:
    """This rank's share of the conversion (training/universal_split.py); False when the layout needs DeepSpeed's
    single-process converter (the same answer on every rank)."""
    from lumina_ds.training.universal_split import UNSPLITTABLE

    out = staging(target) / target.name
    command = [sys.executable, "-m", "lumina_ds.training.universal_split", "--input", str(tag_dir),
               "--output", str(out), "--rank", str(rank), "--world", str(world)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode == UNSPLITTABLE:
        return False
    if done.returncode != 0:
        raise _refused(tag_dir, done)
    return True


def finish(tag_dir: Path, target: Path) -> None:
    """Rank 0, after every rank's share: the files of no parameter, the marker from every part's checksums (each
    file listed exactly once, and nothing on disk unlisted), then the staging folder renamed into place."""
    out = staging(target) / target.name
    command = [sys.executable, "-m", "lumina_ds.training.universal_split", "--input", str(tag_dir),
               "--output", str(out), "--finish"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise _refused(tag_dir, done)
    files, problem = _gathered(staging(target), out)
    if problem:
        raise CheckpointError("E303", f"the universal conversion of {tag_dir} is incomplete: {problem}")
    _seal(tag_dir, out, target, dict(sorted(files.items())))


def _gathered(folder: Path, out: Path) -> tuple[dict[str, Any], str | None]:
    """Every part's checksums in one list, and what is wrong with them: a rank's share missing, a file listed twice
    or not at all, or a merge pattern no parameter matched (DeepSpeed's strict check, over all ranks)."""
    parts = [json.loads(p.read_text()) for p in sorted(folder.glob("digests.*.json"))]
    shares = [p for p in parts if p["rank"] is not None]
    world = shares[0]["world"] if shares else 0
    files: dict[str, Any] = {}
    unmatched: set[str] | None = None
    for part in parts:
        if files.keys() & part["files"].keys():
            return files, f"files listed twice: {sorted(files.keys() & part['files'].keys())[:3]}"
        files.update(part["files"])
        if part["unmatched"] is not None:
            unmatched = set(part["unmatched"]) if unmatched is None else unmatched & set(part["unmatched"])
    ranks = sorted(p["rank"] for p in shares)
    if ranks != list(range(world)) or len(parts) != world + 1:
        return files, f"found the shares of ranks {ranks} of {world} and {len(parts) - len(shares)} finish"
    if unmatched:
        return files, f"unused patterns {sorted(unmatched)}"
    if set(files) != {str(p.relative_to(out)) for p in tag_files(out)}:
        return files, "the files on disk are not those the ranks listed"
    return dict(sorted(files.items())), None


def _seal(tag_dir: Path, out: Path, target: Path, files: dict[str, Any]) -> None:
    marker = {
        "source": str(tag_dir.resolve()),
        "source_digest": _source_digest(tag_dir),
        "deepspeed": _deepspeed_version(),
        "files": files,
    }
    (out / MARKER).write_text(json.dumps(marker))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(out, target)
    shutil.rmtree(out.parent, ignore_errors=True)


def convert(tag_dir: Path, target: Path) -> None:
    """DeepSpeed's own converter in one process (rank 0), for what the split does not cover: staged, checksummed,
    then renamed into place."""
    # its own staging folder: one process converts, and a chat or export may convert the same tag meanwhile
    work = target.parent / f".{target.name}.converting-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out = work / target.name  # DeepSpeed writes `latest_universal` beside its output folder
    try:
        command = [sys.executable, "-m", "lumina_ds.training.universal", "--input_folder", str(tag_dir),
                   "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers",
                   str(CONVERT_WORKERS), "--num_merge_workers", str(CONVERT_WORKERS)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise _refused(tag_dir, done)
        files = {str(p.relative_to(out)): {"size": p.stat().st_size, "xxh3": file_digest(p)} for p in tag_files(out)}
        _seal(tag_dir, out, target, files)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def remove_others(target: Path) -> None:
    """Keep one conversion (each is about a tag's size): the others under the same folder go, an abandoned staging
    folder too."""
    for path in target.parent.iterdir():
        if path != target and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


# ---- loading ------------------------------------------------------------------------------------------------------
class _Adapter:
    """torch.load of the universal files, adapted to the target engine's parameters (see the module docstring)."""

    def __init__(self, engine: Engine, zero_dir: Path, *, autoep_target: bool, num_experts: int) -> None:
        self.zero_dir = zero_dir
        self.autoep_target, self.num_experts = autoep_target, num_experts
        self.groups = len(engine.optimizer.param_groups)
        self.shapes = {
            canonical(n): tuple(getattr(p, "ds_shape", p.shape)) for n, p in engine.module.named_parameters()
        }

    def __call__(self, path: str, loaded: Any) -> Any:
        if path.endswith("optimizer_state.pt") and isinstance(loaded, dict) and "param_groups" in loaded:
            groups = loaded["param_groups"]
            loaded["param_groups"] = groups + [dict(groups[-1]) for _ in range(self.groups - len(groups))]
        folder = Path(path).parent.name
        if not EXPERT_WEIGHT.fullmatch(folder) or Path(path).name == "step.pt":
            return loaded
        if torch.is_tensor(loaded):
            if not self.autoep_target:
                return loaded
            full = (
                self.num_experts,
                *self.shapes[canonical(folder)][1:],
            )  # the target's own shape is per expert-parallel rank
            loaded = {"param": loaded.view(full), "cat_dim": 0}
        if self.autoep_target:
            loaded.update(is_expert_param=True, ep_num_experts=loaded["param"].shape[0])
        else:
            loaded.pop("is_expert_param", None)
            loaded.pop("ep_num_experts", None)
        return loaded


def _folders_for(param_names: dict[Any, str], zero_dir: Path) -> dict[Any, str]:
    """Each parameter's universal folder: its own name, else the same parameter under the other MoE naming."""
    folders = {canonical(p.name): p.name for p in zero_dir.iterdir() if p.is_dir()}
    mapped = {}
    for param, name in param_names.items():
        folder = name if (zero_dir / name).is_dir() else folders.get(canonical(name))
        if folder is None:
            raise CheckpointError(
                "E303",
                f"the universal checkpoint {zero_dir.parent} has no parameter {name}",
                "resume with the architecture that saved it",
            )
        mapped[param] = folder
    return mapped


@contextlib.contextmanager
def adapted_load(engine: Engine, universal: Path, *, autoep_target: bool, num_experts: int) -> Iterator[None]:
    """Within the block, engine.load_checkpoint of `universal` loads weights only, adapted to this engine."""
    optimizer = engine.optimizer
    names: dict[Any, str] = optimizer.param_names
    original = dict(names)
    kept = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    adapter = _Adapter(engine, universal / "zero", autoep_target=autoep_target, num_experts=num_experts)
    config = engine._config  # type: ignore[attr-defined]  # DeepSpeed consults it only when loading
    with weights_only_loads():
        safe_load = torch.load

        def load(f: Any, *args: Any, **kwargs: Any) -> Any:
            if MMAP_LOADS and isinstance(f, str | os.PathLike) and Path(f).is_relative_to(universal):
                kwargs["mmap"] = True  # DeepSpeed slices this rank's part: the other pages are never read
            return adapter(str(f), safe_load(f, *args, **kwargs))

        torch.load = load
        names.update(_folders_for(original, universal / "zero"))
        config.load_universal_checkpoint = True
        try:
            yield
        finally:
            torch.load = safe_load
            names.clear()
            names.update(original)
            # the run's own tags are plain checkpoints: a later rewind to one must not be read as universal
            config.load_universal_checkpoint = False
    _restore_groups(engine, kept)


def _restore_groups(engine: Engine, kept: list[dict[str, Any]]) -> None:
    """Every param group's own settings back, with the learning rate the restored scheduler left; each state its own
    step counter (ZeRO-3 gives every sub-group the same tensor, which AdamW then advances once per sub-group)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    groups = engine.optimizer.param_groups
    scheduler = getattr(engine, "lr_scheduler", None)
    lr = float(scheduler.get_last_lr()[0]) if scheduler is not None else float(groups[0]["lr"])
    for group, settings in zip(groups, kept, strict=True):
        group.update(settings, lr=lr)
    if scheduler is not None:  # one entry per group (all groups share the schedule)
        scheduler.base_lrs = [scheduler.base_lrs[0]] * len(groups)
        scheduler._last_lr = [lr] * len(groups)


def main(argv: list[str]) -> None:
    """`python -m lumina_ds.training.universal ...`: DeepSpeed's ds_to_universal, reading the checkpoint with weights
    only (a tampered file is refused, not run)."""
    import multiprocessing

    from deepspeed.checkpoint import ds_to_universal

    multiprocessing.set_start_method("fork", force=True)  # the converter's workers inherit the safe torch.load
    sys.argv = ["ds_to_universal", *argv]
    with weights_only_loads():
        ds_to_universal.main(ds_to_universal.parse_arguments())


if __name__ == "__main__":
    main(sys.argv[1:])
