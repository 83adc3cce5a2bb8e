"""The package's layers: no import runs back up, no import circles (issue 20). See docs/architecture.md."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import mimkit

# Lowest first. A module may import its own group and the layers below it, never a layer above, and never a
# sibling group of its own layer (data, models and metrics know nothing of each other).
LAYERS: list[tuple[str, ...]] = [
    ("mimkit", "mimkit.errors"),            # the root (its __version__) and the error types
    ("mimkit.io",),                         # safe file reading, checkpoint resolution
    ("mimkit.data", "mimkit.models", "mimkit.metrics"),
    ("mimkit.engine",),                     # THE loop and what it needs; no model, no task
    ("mimkit.config",),                     # schemas, layers, the Flag tables' builder
    ("mimkit.tasks",),                      # one recipe per command; tasks may build on tasks
    ("mimkit.commands",),                   # the command table and parsing
    ("mimkit.api",),                        # the Python API: the one path every command runs through
    ("mimkit.cli",),                        # the console entry; nothing imports it
    ("mimkit.__main__",),                   # `python -m mimkit`, `torchrun -m mimkit`
]
# The root package's lazy facade (`mimkit.pretrain(...)` imported on first use) is the one sanctioned edge upward.
FACADE = {("mimkit", "mimkit.api")}


def module_name(root: Path, f: Path) -> str:
    """src/mimkit/tasks/knn.py -> mimkit.tasks.knn; a package's __init__ -> the package."""
    parts = list(f.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in the file (a lazy import is still an edge)."""
    files = {module_name(root, f): f for f in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, f in files.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                         for a in node.names]
            else:
                continue
            edges |= {n for n in names if n in files and n != mod}
        graph[mod] = edges - {b for a, b in FACADE if a == mod}
    return graph


def group_of(module: str) -> tuple[int, str]:
    """(layer index, group) of a module: the longest group name it falls under."""
    best = None
    for i, groups in enumerate(LAYERS):
        for g in groups:
            if (module == g or module.startswith(g + ".")) and (best is None or len(g) > len(best[1])):
                best = (i, g)
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and docs/architecture.md)"
    return best


def back_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every edge that runs up the layers or across sibling groups, as 'a -> b'."""
    bad = []
    for a, targets in graph.items():
        la, ga = group_of(a)
        for b in targets:
            lb, gb = group_of(b)
            if lb > la or (lb == la and ga != gb):
                bad.append(f"{a} -> {b}")
    return sorted(bad)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected sets of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


ROOT = Path(mimkit.__file__).parent


def test_no_import_runs_back_up() -> None:
    assert back_imports(import_graph(ROOT)) == []


def test_no_import_circles() -> None:
    assert circles(import_graph(ROOT)) == []


def test_the_checks_catch_a_planted_back_import_and_circle(tmp_path) -> None:
    tree = tmp_path / "mimkit"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns("__pycache__", "configs"))
    assert back_imports(import_graph(tree)) == [] and circles(import_graph(tree)) == []
    # a data module reaching up into a task, as incremental/ once reached into tasks/
    (tree / "data" / "planted.py").write_text("def f():\n    from mimkit.tasks.knn import run\n    return run\n")
    assert back_imports(import_graph(tree)) == ["mimkit.data.planted -> mimkit.tasks.knn"]
    # two modules importing each other, as segment.py and segment_eval.py once did
    (tree / "tasks" / "ping.py").write_text("from mimkit.tasks import pong\n")
    (tree / "tasks" / "pong.py").write_text("def f():\n    from mimkit.tasks.ping import x\n")
    assert ["mimkit.tasks.ping", "mimkit.tasks.pong"] in circles(import_graph(tree))
    # a sibling group of the same layer: models knowing a dataset
    (tree / "models" / "planted.py").write_text("import mimkit.data.images\n")
    assert "mimkit.models.planted -> mimkit.data.images" in back_imports(import_graph(tree))


def test_every_module_sits_in_a_layer() -> None:
    for module in import_graph(ROOT):
        group_of(module)


def test_no_task_file_is_a_package_in_disguise() -> None:
    """No tasks/<command>_<part>.py (a package of its own instead) and no task module over ~400 lines."""
    from mimkit.commands import COMMANDS

    flat = [f.name for f in (ROOT / "tasks").glob("*.py")]
    assert not [n for n in flat for c in COMMANDS if n.startswith(c + "_")]
    long = {str(f.relative_to(ROOT)): n for f in (ROOT / "tasks").rglob("*.py")
            if (n := len(f.read_text().splitlines())) > 420}
    assert long == {}
