"""The package layout holds: one ``flowship`` namespace, a core that knows nothing of the agent, no cycles.

exporter/ is imported as ``flowship`` (the core: model, config, pipeline, sources, stages, sinks) and
agent/ as ``flowship.agent`` (pyproject's package-dir). The agent builds on the core, never the other way
round; only the command line (``flowship.cli``) stands above both, and the registry names the agent's
source by its module path so that it is imported only by a config that uses it. Every import counts here,
function-level ones included: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FOLDERS = {"exporter": "flowship", "agent": "flowship.agent"}
ABOVE_BOTH = {"flowship.cli"}


def _module_name(path: Path) -> str:
    folder, *rest = path.relative_to(REPO).with_suffix("").parts
    parts = [FOLDERS[folder], *rest]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    """Module → the flowship modules it imports (``from a import b`` counts b when b is a module)."""
    paths = {_module_name(p): p for folder in FOLDERS for p in (REPO / folder).rglob("*.py")
             if "_pb2" not in p.name}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("flowship"))
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("flowship"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in paths)
        graph[name] = {m for m in found if m in paths and m != name}
    return graph


def test_the_core_imports_nothing_from_the_agent() -> None:
    offenders = {name: sorted(m for m in deps if m.startswith("flowship.agent"))
                 for name, deps in _graph().items()
                 if not name.startswith("flowship.agent") and name not in ABOVE_BOTH}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_import_cycles() -> None:
    graph = _graph()
    # package __init__ modules are parents, not dependencies: an edge to one is an edge to what it defines
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
