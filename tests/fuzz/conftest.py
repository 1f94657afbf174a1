"""Fuzzing fixtures: how many inputs each fuzz test tried, printed at the end of the run.

On CI (``CI`` set) the examples are derandomized, so a run there is repeatable and does not stumble on
a new input while checking someone else's change; locally every run explores new inputs.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

TRIED = pytest.StashKey[Counter]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[TRIED] = Counter()


@pytest.fixture(scope="session")
def tried(request: pytest.FixtureRequest) -> Counter:
    """``tried[name] += 1`` for every fuzz input a test ran."""
    return request.config.stash[TRIED]


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:  # noqa: ANN001
    counts = config.stash.get(TRIED, Counter())
    if not counts:
        return
    terminalreporter.section("fuzz inputs tried")
    for name, n in sorted(counts.items()):
        terminalreporter.write_line(f"{n:8d}  {name}")
    terminalreporter.write_line(f"{sum(counts.values()):8d}  total")
