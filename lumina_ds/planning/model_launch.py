"""The launch-time plan of `train --init-from PATH`: no preset layout was planned for the source's model, so on GPUs
the run takes the layout `lumina-ds plan --model PATH` chooses for the cluster it starts on (the planner's fastest
that fits, the layout flags given kept as given), and says so in one line; nothing fitting is `plan`'s E201/E202.

On a CPU the step-time model (a GPU's) has nothing to choose between, so the run is checked as configured, as
launch_gate does for a run from --config-file.
"""

from __future__ import annotations

from dataclasses import replace

from lumina_ds.config.io import deep_merge
from lumina_ds.config.run import RunConfig
from lumina_ds.errors import MemoryPlanError
from lumina_ds.planning.launch_gate import PLANNED_FIELDS, Machine, apply_candidate, check_launch, keeps
from lumina_ds.planning.layouts import planned_extras
from lumina_ds.planning.memory_inputs import GIB, ParamInventory
from lumina_ds.planning.planner import DEFAULT_MFU, Candidate, evaluate, nothing_fits


def plan_model_at_launch(
    run: RunConfig, machine: Machine, *, precision: str, explicit: set[str], name: str
) -> str | None:
    """Take the fastest layout that fits `machine` and keeps the fields in `explicit` into `run` (with the DeepSpeed
    keys the memory model assumed, under the user's); the line that says so. `name` is the model's path, for the
    messages. On a CPU: check the run as configured (None when it fits)."""
    labelled = replace(run, preset=name)  # the planner's messages name the model, not the base preset
    if machine.device_gib is None:
        try:
            return check_launch(labelled, machine, precision=precision, explicit=explicit, planned_for=None)
        except MemoryPlanError as err:
            raise MemoryPlanError(err.code, err.message, f"a smaller model, or `lumina-ds plan --model {name} "
                                  "--nodes N` for the GPU clusters it fits") from None  # fmt: skip
    inv = ParamInventory.of(run.model)
    cluster = machine.cluster
    candidates = evaluate(labelled, cluster, inv, seq_len=run.seq_len, precision=precision, mfu=DEFAULT_MFU)
    fitting = [c for c in candidates if c.rejection is None]
    allowed = [c for c in fitting if keeps(c, run, explicit)]
    if not allowed:
        if fitting:
            raise flags_refusal(run, candidates, fitting[0], explicit=explicit, name=name)
        error = nothing_fits(labelled, cluster, candidates, inv, seq_len=run.seq_len, precision=precision)
        raise MemoryPlanError(error.code, f"on this machine: {error.message}",
                              f"{error.hint} (as `lumina-ds plan --model {name}` takes them: launch on that many "
                              "nodes)")  # fmt: skip
    best = allowed[0]
    adopt(run, best)
    command = f"`lumina-ds plan --model {name} --nodes {cluster.nodes} --gpus-per-node {cluster.gpus_per_node}`"
    flags = layout_flags(explicit)
    how = f"the fastest with {flags} as given; {command} shows the others" if flags else f"as {command} chooses it"
    return (f"launch-time plan for {name} on {machine.describe()}: {best.describe()}, "
            f"{best.estimate.gpu_total / GIB:.1f} GiB per GPU, host {best.estimate.host_total / GIB:.1f} GiB per "
            f"node ({how})")  # fmt: skip


def layout_flags(explicit: set[str]) -> str:
    """The layout flags among those given, as the command line spells them."""
    return ", ".join(sorted(f"--{dest.replace('_', '-')}" for dest in explicit if dest in PLANNED_FIELDS))


def adopt(run: RunConfig, best: Candidate) -> None:
    """The planned layout into the (not yet frozen) run, with the bucket sizes and overlap it was planned with."""
    apply_candidate(run, best)
    if best.layout.offload_device == "nvme":  # only planned where the machine has space at run's --nvme-path
        run.distributed.offload_device = "nvme"
    run.distributed.deepspeed = deep_merge(planned_extras(best.layout), run.distributed.deepspeed)


def flags_refusal(
    run: RunConfig, candidates: list[Candidate], fastest: Candidate, *, explicit: set[str], name: str
) -> MemoryPlanError:
    """Layouts fit, but none with the layout flags given: E201 (or E202 where only the host is short) naming them."""
    kept = [c for c in candidates if keeps(c, run, explicit)]
    flags = layout_flags(explicit)
    hint = (f"drop {flags}: `lumina-ds plan --model {name}` chooses {fastest.describe()} "
            f"({fastest.estimate.gpu_total / GIB:.1f} GiB per GPU)")  # fmt: skip
    if not kept:  # e.g. an expert-parallel size that does not divide the GPUs: no such layout to weigh
        return MemoryPlanError("E201", f"on this machine: no layout the planner weighs has {flags} as given", hint)
    least = min(kept, key=lambda c: c.estimate.gpu_total)
    code = "E202" if (least.rejection or "").startswith("host") else "E201"
    why = f"the smallest such layout ({least.describe()}) is rejected, {least.rejection}"
    return MemoryPlanError(code, f"on this machine: {name} does not fit with {flags} as given: {why}", hint)
