"""The package's shape: no import cycles, and each layer imports only the layers below it (README "Architecture")."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lumina_ds"

# who may import whom, by top-level part of lumina_ds (leaf modules batch, errors, run_dir count as their own part)
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "batch": set(),
    "config": {"errors", "models"},  # models: ModelConfig.build() and type hints
    "run_dir": {"errors"},
    "models": {"errors", "batch", "config"},
    "data": {"errors", "batch", "config"},
    "monitor": {"errors"},
    "distributed": {"errors", "batch", "config", "models", "run_dir"},
    "generation": {"errors", "batch", "config", "models", "data", "run_dir"},
    "planning": {"errors", "config", "models", "distributed", "data"},
    "hf": {"errors", "batch", "config", "models", "data", "run_dir"},
    "training": {"errors", "batch", "config", "models", "data", "distributed", "monitor", "run_dir", "hf"},
    "cli": {
        "__init__",
        "errors",
        "config",
        "data",
        "distributed",
        "planning",
        "training",
        "generation",
        "models",
        "hf",
        "monitor",  # the run report
    },
    "__init__": set(),
    "__main__": {"cli"},
}
NEVER_IN_MODELS = ("deepspeed", "torch.distributed")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(tree: ast.Module, *, module_level_only: bool) -> Iterator[str]:
    """Dotted names a module imports at run time (not under `if TYPE_CHECKING:`), each `from a import b` as a.b."""
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        elif module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        else:
            stack.extend(ast.iter_child_nodes(node))


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str, known: set[str]) -> str | None:
    """The lumina_ds module a dotted import name lands in (`from a import b` is module a.b or a name in a)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    graph: dict[str, set[str]] = {}
    for name, tree in trees.items():
        targets = {resolve(n, known) for n in imported_names(tree, module_level_only=True) if n.startswith("lumina_ds")}
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
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_each_layer_imports_only_the_layers_below_it() -> None:
    trees = modules()
    known = set(trees)
    wrong = []
    for name, tree in trees.items():
        part = part_of(name)
        for imported in imported_names(tree, module_level_only=False):
            target = resolve(imported, known) if imported.startswith("lumina_ds") else None
            if target is None or part_of(target) == part:
                continue
            if part_of(target) not in ALLOWED[part]:
                wrong.append(f"{name} imports {target}")
    assert wrong == []


@pytest.mark.parametrize("path", sorted((PACKAGE / "models").glob("*.py")), ids=lambda p: p.name)
def test_models_import_neither_deepspeed_nor_torch_distributed(path: Path) -> None:
    """A model is a plain nn.Module that runs in one process; parallelism is applied from lumina_ds.distributed."""
    names = list(imported_names(ast.parse(path.read_text()), module_level_only=False))
    assert not [n for n in names if n.startswith(NEVER_IN_MODELS)]
