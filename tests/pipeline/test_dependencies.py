"""Every third-party package the runtime code imports is declared in pyproject's ``dependencies``.

Static and fast: every ``import`` under exporter/ and agent/ (function-level ones too, which an import walk
of the installed package never executes) is mapped to the distribution that provides it here. A module
that is only present as someone else's dependency (urllib3 through requests) counts as undeclared. The
fresh-install test (test_fresh_install.py) checks the same from the other side, in an empty venv.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("exporter", "agent")  # imported as flowship and flowship.agent
OWN = {"flowship"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for folder in FOLDERS:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top not in OWN and top not in sys.stdlib_module_names:
                        found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_runtime_imports_are_declared_dependencies() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_canonical(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0]) for req in project["dependencies"]}
    providers = importlib.metadata.packages_distributions()
    problems = []
    for module, files in sorted(_imports().items()):
        dists = {_canonical(d) for d in providers.get(module, [])}
        if not dists:
            problems.append(f"{module} (imported by {sorted(files)}) is not installed here and not declared")
        elif not dists & declared:
            problems.append(f"{module} (imported by {sorted(files)}) comes from {sorted(dists)}, which pyproject "
                            "does not declare")
    assert not problems, "\n".join(problems)
