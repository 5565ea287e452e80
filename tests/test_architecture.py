"""The package's shape (docs/architecture.md): no import cycle, counting every import anywhere in a module (function
bodies and `TYPE_CHECKING` blocks included); each layer imports only the layers below it; the data and tokenizer
packages are entered through their public modules only."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lumina_ds"
LEAVES = {"errors", "batch", "frozen"}  # leaf modules any layer may import

# who may import whom, by top-level part of lumina_ds (besides the leaves)
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "batch": set(),
    "frozen": set(),
    "run_dir": set(),
    "models": set(),
    "config": {"models"},  # the model's config lives next to the model
    "tokenizer": set(),
    "data": {"config", "tokenizer"},
    "monitor": set(),
    "distributed": {"config", "models", "run_dir"},
    "generation": {"config", "models", "tokenizer", "run_dir"},
    "planning": {"config", "models", "distributed", "tokenizer"},
    "hf": {"config", "models", "tokenizer", "run_dir"},
    "training": {"config", "models", "tokenizer", "data", "distributed", "monitor", "run_dir", "hf"},
    "cli": {
        "__init__",
        "config",
        "data",
        "tokenizer",
        "distributed",
        "planning",
        "training",
        "generation",
        "models",
        "hf",
        "monitor",
    },
    "__init__": set(),
    "__main__": {"cli"},
}
NEVER_IN_MODELS = ("deepspeed", "torch.distributed")
# the one door into a package for the rest of lumina_ds
PUBLIC = {"data": {"lumina_ds.data", "lumina_ds.data.train_data"}, "tokenizer": {"lumina_ds.tokenizer"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(tree: ast.Module) -> Iterator[str]:
    """Every dotted name a module imports, wherever the import statement is; `from a import b` as a.b."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str, known: set[str]) -> str | None:
    """The lumina_ds module a dotted import name lands in (`from a import b` is module a.b or a name in a)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    known = set(trees)
    graph: dict[str, set[str]] = {}
    for name, tree in trees.items():
        targets = {resolve(n, known) for n in imported_names(tree) if n.startswith("lumina_ds")}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph(modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    "planted",
    [
        "def _late():\n    from lumina_ds.training.trainer import Trainer\n",  # a lazy import in a function body
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lumina_ds.training.trainer import Trainer\n",
    ],
    ids=["function body", "TYPE_CHECKING"],
)
def test_a_planted_import_that_closes_a_circle_is_found(planted: str) -> None:
    """training.trainer imports training.checkpoint; an import of the trainer back from checkpoint closes a circle."""
    trees = modules()
    source = (PACKAGE / "training" / "checkpoint.py").read_text() + "\n" + planted
    trees["lumina_ds.training.checkpoint"] = ast.parse(source)
    cycle = find_cycle(import_graph(trees))
    assert cycle is not None and "lumina_ds.training.checkpoint" in cycle and "lumina_ds.training.trainer" in cycle


def test_each_layer_imports_only_the_layers_below_it() -> None:
    trees = modules()
    known = set(trees)
    wrong = []
    for name, tree in trees.items():
        part = part_of(name)
        for imported in imported_names(tree):
            target = resolve(imported, known) if imported.startswith("lumina_ds") else None
            if target is None or part_of(target) in {part, *LEAVES}:
                continue
            if part_of(target) not in ALLOWED[part]:
                wrong.append(f"{name} imports {target}")
    assert wrong == []


def test_the_data_and_tokenizer_packages_are_entered_through_their_public_modules() -> None:
    """Outside `data/` only `lumina_ds.data` (the data commands) and `lumina_ds.data.train_data` (training) are
    imported, and each other package uses one of them; outside `tokenizer/`, only `lumina_ds.tokenizer`. Inside, no
    module imports its own package's door (which would import the whole package back)."""
    trees = modules()
    known = set(trees)
    wrong, doors = [], {}
    for name, tree in trees.items():
        for imported in imported_names(tree):
            target = resolve(imported, known) if imported.startswith("lumina_ds") else None
            inner = part_of(target) if target else None
            if inner not in PUBLIC:
                continue
            inside = part_of(name) == inner
            if (not inside and target not in PUBLIC[inner]) or (inside and target == f"lumina_ds.{inner}"):
                wrong.append(f"{name} imports {target}")
            if inner == "data" and not inside:
                doors.setdefault(part_of(name), set()).add(target)
    assert wrong == []
    assert all(len(used) == 1 for used in doors.values()), doors
    assert not doors.keys() & {"hf", "generation"}, doors  # they need the tokenizer, not the data


@pytest.mark.parametrize("path", sorted((PACKAGE / "models").glob("*.py")), ids=lambda p: p.name)
def test_models_import_neither_deepspeed_nor_torch_distributed(path: Path) -> None:
    """A model is a plain nn.Module that runs in one process; parallelism is applied from lumina_ds.distributed."""
    names = list(imported_names(ast.parse(path.read_text())))
    assert not [n for n in names if n.startswith(NEVER_IN_MODELS)]
