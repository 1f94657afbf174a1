"""Fixtures of the security tests: the real dev servers (started if needed, never stopped) and exports."""

from __future__ import annotations

import time
import uuid

import pytest
from security_helpers import Export, devservers


@pytest.fixture(scope="session")
def kafka_server() -> str:
    devservers.start("kafka", devservers.KAFKA)
    return devservers.KAFKA


@pytest.fixture(scope="session")
def opensearch_server() -> str:
    devservers.start("opensearch", devservers.OPENSEARCH)
    return devservers.OPENSEARCH


@pytest.fixture(scope="session")
def victorialogs_server() -> str:
    devservers.start("victorialogs", devservers.VICTORIALOGS)
    return devservers.VICTORIALOGS


@pytest.fixture()
def run_id() -> str:
    """Unique, lowercase: usable in topic, index, data stream and label names on the shared servers."""
    return f"{int(time.time())}{uuid.uuid4().hex[:6]}"


@pytest.fixture()
def exports() -> list[Export]:
    """Exports a test starts; any still running at the end are stopped."""
    started: list[Export] = []
    yield started
    for export in started:
        if export.proc is not None and export.proc.poll() is None:
            export.proc.kill()
            export.proc.wait()
