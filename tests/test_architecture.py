"""The package's shape, checked from its source: layers without back edges, no import cycle,
private API only inside the seam (``dbkit/fastpath/``), a transaction core of small modules.

ruff's SLF001 catches ``obj._private`` outside the seam; these tests catch what it cannot
see: private names *imported* (``from sqlalchemy.pool.base import _ConnectionRecord``) and
imports that point up the layers, function-level ones included.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dbkit"

# Lowest first.  A module may import from its own layer and the layers below it, never
# from one above.  Within a layer, any direction, as long as there is no cycle.
LAYERS: list[tuple[str, set[str]]] = [
    (
        "foundations",
        {
            "dbkit.durations",
            "dbkit.errors",
            "dbkit.stats",
            "dbkit.settings",
            "dbkit.metrics",
            "dbkit.resilience",
            "dbkit.health",
            "dbkit.logging",
            "dbkit.progress",
            "dbkit.schema",
            "dbkit.admin",
            "dbkit.xact",
            "dbkit.retrying",
        },
    ),
    ("seam", {"dbkit.fastpath"}),
    ("engine and pool", {"dbkit.pool", "dbkit.engine"}),
    ("connection", {"dbkit.connection"}),
    ("transaction", {"dbkit.transaction"}),
    ("database", {"dbkit.database", "dbkit.locks", "dbkit.replicas"}),
    (
        "repository",
        {
            "dbkit.repository",
            "dbkit.repositories",
            "dbkit.otel",
            "dbkit.prometheus",
            "dbkit.budget",
            "dbkit.twophase",
        },
    ),
    (
        "apps",
        {
            "dbkit.local",
            "dbkit.migrate",
            "dbkit.scaffold",
            "dbkit.cli",
            "dbkit.demo",
            "dbkit.testing",
            "dbkit.__main__",
            "dbkit",
        },
    ),
]
THIRD_PARTY_WITH_PRIVATE_API = ("sqlalchemy", "psycopg", "psycopg_pool")
TRANSACTION_CORE = [
    "connection.py",
    *(f"transaction/{p.name}" for p in (PACKAGE / "transaction").glob("*.py")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> Iterator[tuple[str, Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield module_name(path), path, ast.parse(path.read_text(), str(path))


def layer_of(module: str) -> int:
    best = None
    for index, (_, members) in enumerate(LAYERS):
        for member in members:
            inside = module == member or module.startswith(member + ".")
            if inside and (best is None or len(member) > len(best[1])):
                best = (index, member)
    assert best is not None, f"{module} is in no layer of tests/test_architecture.py"
    return best[0]


def type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (no runtime edge)."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                found.update(id(n) for n in ast.walk(inner))
    return found


def imports(module: str, tree: ast.Module) -> Iterator[tuple[str, list[str], bool, int]]:
    """(imported module, names, at run time, line) for every import, at any depth."""
    static = type_checking_nodes(tree)
    package = (
        module
        if (PACKAGE.parent / module.replace(".", "/")).is_dir()
        else module.rpartition(".")[0]
    )
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], id(node) not in static, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base, [a.name for a in node.names], id(node) not in static, node.lineno


def dbkit_targets(target: str, names: list[str]) -> list[str]:
    """The dbkit modules an import statement reaches (``from dbkit import demo`` is one)."""
    if target != "dbkit" and not target.startswith("dbkit."):
        return []
    found = []
    for name in names:
        candidate = f"{target}.{name}"
        path = PACKAGE.parent / candidate.replace(".", "/")
        if path.with_suffix(".py").exists() or path.is_dir():
            found.append(candidate)
    return found or [target]


def test_no_layer_imports_a_higher_one() -> None:
    wrong = []
    for module, path, tree in modules():
        own = layer_of(module)
        for target, names, _, line in imports(module, tree):
            for reached in dbkit_targets(target, names):
                if layer_of(reached) > own:
                    wrong.append(
                        f"{path.relative_to(PACKAGE.parent)}:{line}: {module} "
                        f"({LAYERS[own][0]}) imports {reached} ({LAYERS[layer_of(reached)][0]})"
                    )
    assert not wrong, "\n".join(wrong)


def test_no_runtime_import_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for module, _, tree in modules():
        edges = graph.setdefault(module, set())
        for target, names, runtime, _ in imports(module, tree):
            if runtime:
                edges.update(t for t in dbkit_targets(target, names) if t != module)
    # A package's __init__ importing its own submodules is how packages re-export.
    for module, edges in graph.items():
        graph[module] = {t for t in edges if not module or not t.startswith(module + ".")}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


def test_private_names_are_imported_only_inside_the_seam() -> None:
    wrong = []
    for module, path, tree in modules():
        if module.startswith("dbkit.fastpath"):
            continue
        for target, names, _, line in imports(module, tree):
            root = target.split(".")[0]
            if root not in (*THIRD_PARTY_WITH_PRIVATE_API, "dbkit"):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private += [p for p in target.split(".") if p.startswith("_") and p != "__main__"]
            if private:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {target} {private}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("relative", TRANSACTION_CORE)
def test_transaction_core_modules_stay_small(relative: str) -> None:
    lines = len((PACKAGE / relative).read_text().splitlines())
    assert lines <= 500, f"dbkit/{relative} has {lines} lines: split it by concern"


def test_the_checks_see_a_back_edge_and_a_private_import(tmp_path: Path) -> None:
    """The helpers above can fail: a planted back edge and private import are found."""
    tree = ast.parse(
        "from dbkit.repository import Repository\n"
        "def late():\n    from sqlalchemy.pool.base import _ConnectionRecord\n"
    )
    found = list(imports("dbkit.engine", tree))
    assert ("dbkit.repository", ["Repository"], True, 1) in found
    assert layer_of("dbkit.repository.base") > layer_of("dbkit.engine")
    assert ("sqlalchemy.pool.base", ["_ConnectionRecord"], True, 3) in found
