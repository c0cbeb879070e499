"""The package's shape, read from its import graph (every import statement, at any depth, of every module).

Imports flow one way (docs/architecture.md): entry points -> trainers / inference / interop / pods -> runs -> models,
data, training, parallel. No module or folder imports itself back through another, nothing used at inference time
reaches `trainers/`, and the core never imports `shapes/` (a recipe names what it adds, in `config.extensions`).
"""
from __future__ import annotations

import ast
import os
from collections import Counter

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dalle_jax")
INFERENCE = ("dalle_jax.runs", "dalle_jax.inference", "dalle_jax.interop", "dalle_jax.serve")
CORE = ("dalle_jax.data", "dalle_jax.models", "dalle_jax.training", "dalle_jax.parallel", "dalle_jax.runs",
        "dalle_jax.inference", "dalle_jax.interop", "dalle_jax.trainers", "dalle_jax.pods", "dalle_jax.extensions",
        "dalle_jax.serve")


def module_files(package_dir: str = PACKAGE) -> dict[str, str]:
    """Module name -> file, for every .py file of the package (a package is named by its __init__.py)."""
    root = os.path.dirname(package_dir)
    modules = {}
    for folder, _, files in os.walk(package_dir):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                modules[module.removesuffix(".__init__")] = path
    return modules


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a name imported from a package counts as its submodule when
    there is one)."""
    graph = {}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
        graph[module] = {t for t in targets if t in modules and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that starts and ends at the same node, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def folder_of(module: str) -> str:
    """The top-level group a module belongs to: `dalle_jax.runs.seq2seq` -> `dalle_jax.runs`."""
    return ".".join(module.split(".")[:2])


def folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    folders: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if module == "dalle_jax":
            continue  # the package's own lazy re-export of the Python API
        edges = folders.setdefault(folder_of(module), set())
        edges.update(folder_of(t) for t in targets if folder_of(t) != folder_of(module))
    return folders


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.fixture(scope="module")
def graph():
    return import_graph(module_files())


def test_the_checks_find_what_they_look_for():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert folder_graph({"dalle_jax.x.a": {"dalle_jax.y.b"}, "dalle_jax.y.b": {"dalle_jax.x.c"}}) == {
        "dalle_jax.x": {"dalle_jax.y"}, "dalle_jax.y": {"dalle_jax.x"}}


def test_no_module_imports_itself_back(graph):
    assert find_cycle(graph) is None


def test_no_folder_imports_itself_back(graph):
    assert find_cycle(folder_graph(graph)) is None


@pytest.mark.parametrize("start", INFERENCE)
def test_nothing_used_at_inference_reaches_the_trainers(graph, start):
    for module in [m for m in graph if m == start or m.startswith(start + ".")]:
        reached = reachable(graph, module)
        assert not [m for m in reached if m.startswith("dalle_jax.trainers")], module


def test_the_core_never_imports_the_shapes_research(graph):
    for module, targets in graph.items():
        if module.startswith(CORE):
            assert not [t for t in targets if t.startswith("dalle_jax.shapes")], module


def test_no_two_modules_share_a_name():
    names = Counter(m.rsplit(".", 1)[-1] for m in module_files() if not m.endswith(("__init__", "__main__"))
                    and "." in m)
    assert [name for name, count in names.items() if count > 1] == []
