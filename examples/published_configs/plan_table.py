"""The README's table of published models on H100 nodes, as `lumina-ds plan --model` answers for each.

`python examples/published_configs/plan_table.py` rewrites the table in README.md (between its two markers) from the
planner; run it after a change to the memory model or the planner. tests/planning/test_plan_any_model.py fails when
the README's table differs from what this prints. `--print` prints the table and changes nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
README = ROOT / "README.md"
BEGIN = "<!-- published-plans: python examples/published_configs/plan_table.py writes this table -->"
END = "<!-- /published-plans -->"
NODES = (1, 2)  # nodes of 8 H100 80 GB (79.1 GiB as torch reports it), 1 TB host memory each (plan's defaults)
HEADER = [
    "| model | nodes × GPUs | chosen layout (`plan`'s `chosen:` line) | GiB/GPU | host GiB/node | step s |",
    "|---|---|---|---|---|---|",
]


def models() -> list[Path]:
    return sorted(p.parent for p in HERE.glob("*/config.json"))


def row(model: Path, nodes: int) -> str:
    """One model on one cluster, through the code path of `lumina-ds plan --model DIR --nodes N`."""
    from lumina_ds.cli import parse
    from lumina_ds.cli.plan import plan_of, run_of
    from lumina_ds.errors import MemoryPlanError
    from lumina_ds.models.counting import count_parameters
    from lumina_ds.planning.memory_inputs import GIB

    given = str(model.relative_to(ROOT))
    args = parse(["plan", "--model", given, "--nodes", str(nodes), "--gpus-per-node", "8", "--gpu", "h100"])
    run = run_of(args, seq_len=args.seq_len)
    count = count_parameters(run.model)
    name = f"{model.name} ({count.total / 1e9:.1f}B, {count.active / 1e9:.1f}B active)"
    try:
        best = plan_of(args, run).best
    except MemoryPlanError as err:
        return f"| {name} | {nodes} × 8 | {err.code}: {err.hint} | — | — | — |"
    gpu, host = best.estimate.gpu_total / GIB, best.estimate.host_total / GIB
    return f"| {name} | {nodes} × 8 | {best.describe()} | {gpu:.1f} | {host:,.0f} | {best.step_seconds:.2f} |"


def table() -> str:
    rows = [row(model, nodes) for model in models() for nodes in NODES]
    return "\n".join([*HEADER, *rows])


def with_table(readme: str, text: str) -> str:
    """`readme` with the text between the markers replaced by `text`."""
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{text}\n{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the table only (default: rewrite README.md)")
    text = table()
    print(text)
    if not parser.parse_args().print:
        README.write_text(with_table(README.read_text(), text))
        print(f"wrote the table into {README}")


if __name__ == "__main__":
    main()
