"""Fuzzing fixtures: how many inputs each fuzz test tried, printed at the end of the run."""

from __future__ import annotations

from collections import Counter

import pytest

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
