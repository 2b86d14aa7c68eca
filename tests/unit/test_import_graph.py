"""The import graph keeps the road one way: the orchestrator and dashboard never load worker code,
torch or llama.cpp; the worker never loads the orchestrator; farm/ is what both may share.

Walked statically with `ast`, every import counted, those inside functions included: a lazy
import still pulls its module into the process that runs the function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("orchestrator", "dashboard", "worker", "farm")
FORBIDDEN = {
    "orchestrator": ("worker", "dashboard", "torch", "llama_cpp"),
    "dashboard": ("worker", "torch", "llama_cpp"),
    "worker": ("orchestrator", "dashboard"),
    "farm": ("orchestrator", "dashboard", "worker", "torch", "llama_cpp"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, module: str | None = None) -> set[str]:
    """Absolute names of every module an import statement in the file names, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module = module or module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            # `from orchestrator import dispatch` imports the module orchestrator.dispatch.
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def top(name: str) -> str:
    return name.split(".")[0]


def crossings(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{src} imports {dst}" for src, dsts in edges.items() for dst in dsts
                  if top(dst) in FORBIDDEN[top(src)])


def test_imports_resolve_relative_and_lazy_ones(tmp_path):
    """The walker sees what the rule depends on: imports inside functions, `from x import y`, and
    relative imports resolved against the module's package."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    import torch\n    from worker import tasks\n    from .. import base\n    from .kv_cache import KVCache\n")
    assert imports_of(src, "worker.engines.torch.m") >= {"torch", "worker", "worker.tasks", "worker.engines.base",
                                                           "worker.engines.torch.kv_cache"}


def test_no_package_imports_across_the_road():
    edges = graph()
    assert len(edges) > 40 and any("torch" in d for d in edges["worker.engines.torch.backend"])
    assert crossings(edges) == []


def test_a_crossing_would_be_caught():
    assert crossings({"orchestrator.cli": {"worker.tasks"}, "farm.x": {"torch"}, "worker.y": {"farm.contract"}}) == [
        "farm.x imports torch", "orchestrator.cli imports worker.tasks"]


def cycles(edges: dict[str, set[str]], package: str) -> list[list[str]]:
    """Strongly connected components of more than one module among the package's own modules."""
    nodes = {n for n in edges if top(n) == package}
    adj = {n: sorted(d for d in edges[n] if d in nodes and d != n) for n in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in adj[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for n in sorted(nodes):
        if n not in index:
            visit(n)
    return sorted(found)


def test_a_cycle_would_be_caught():
    edges = {"orchestrator.a": {"orchestrator.b"}, "orchestrator.b": {"orchestrator.a"}, "orchestrator.c": set()}
    assert cycles(edges, "orchestrator") == [["orchestrator.a", "orchestrator.b"]]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_inside_a_package(package):
    assert cycles(graph(), package) == []
