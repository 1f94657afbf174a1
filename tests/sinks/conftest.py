"""Fixtures of the sink tests: flows, contexts, and the real servers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import devservers  # noqa: E402
from helpers import make_ctx  # noqa: E402

from flowship.components import Context  # noqa: E402

fixture_batches = devservers.fixture_batches
all_flows = devservers.all_flows
run_id = devservers.run_id
kafka_server = devservers.kafka_server
opensearch_server = devservers.opensearch_server
victorialogs_server = devservers.victorialogs_server


@pytest.fixture()
def ctx(tmp_path: Path) -> Context:
    return make_ctx("sink", tmp_path)
