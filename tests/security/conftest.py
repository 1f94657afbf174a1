"""Fixtures of the security tests: the real dev servers (started if needed, never stopped) and exports."""

from __future__ import annotations

import pytest
from security_helpers import Export, devservers

kafka_server = devservers.kafka_server
opensearch_server = devservers.opensearch_server
victorialogs_server = devservers.victorialogs_server
run_id = devservers.run_id


@pytest.fixture()
def exports() -> list[Export]:
    """Exports a test starts; any still running at the end are stopped."""
    started: list[Export] = []
    yield started
    for export in started:
        if export.proc is not None and export.proc.poll() is None:
            export.proc.kill()
            export.proc.wait()
