"""Shared pytest fixtures: the recorded Hubble flows and small helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# shared/ sits beside the checkout (../shared); CI lays a copy there too.
FIXTURES = Path(os.environ.get("FLOWSHIP_FIXTURES", REPO.parent / "shared" / "fixtures" / "hubble"))


@pytest.fixture(scope="session")
def fixture_files() -> list[Path]:
    files = sorted(FIXTURES.glob("*.jsonl"))
    if not files:
        pytest.fail(f"no Hubble fixtures found in {FIXTURES}: set FLOWSHIP_FIXTURES to the folder "
                    "holding the recorded *.jsonl files")
    return files


@pytest.fixture(scope="session")
def fixture_lines(fixture_files: list[Path]) -> list[bytes]:
    lines = []
    for path in fixture_files:
        lines.extend(line for line in path.read_bytes().split(b"\n") if line.strip())
    return lines


@pytest.fixture()
def flowship_cmd() -> list[str]:
    """How to run the CLI from tests: the installed entry point's module."""
    return [sys.executable, "-m", "flowship.cli"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A private S3 server (versitygw) for one test module: tests/s3server.py."""
    from s3server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3-server"))
    server.servers("start")
    try:
        yield server
    finally:
        server.servers("stop")
