"""Fixtures of the sink tests: flows, contexts, and the real servers."""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import devservers  # noqa: E402
from helpers import decode_fixtures, distinct_flows, make_ctx  # noqa: E402

from exporter.components import Context  # noqa: E402


@pytest.fixture(scope="session")
def fixture_batches(fixture_files: list[Path]) -> dict[str, pa.RecordBatch]:
    """Every recorded fixture file decoded, by file stem."""
    return decode_fixtures(fixture_files)


@pytest.fixture(scope="session")
def all_flows(fixture_batches: dict[str, pa.RecordBatch]) -> pa.RecordBatch:
    """All fixture flows in one batch, one row per distinct uuid."""
    return distinct_flows(list(fixture_batches.values()))


@pytest.fixture()
def ctx(tmp_path: Path) -> Context:
    return make_ctx("sink", tmp_path)


@pytest.fixture()
def run_id() -> str:
    return f"{int(time.time())}{uuid.uuid4().hex[:6]}"


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
