"""Fixtures of the sink tests: flows, contexts, and the real servers."""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import devservers  # noqa: E402

from exporter.components import Context  # noqa: E402
from exporter.metrics import Metrics  # noqa: E402
from exporter.model import hubble_json  # noqa: E402


@pytest.fixture(scope="session")
def fixture_batches(fixture_files: list[Path]) -> dict[str, pa.RecordBatch]:
    """Every recorded fixture file decoded, by file stem."""
    out = {}
    for path in fixture_files:
        result = hubble_json.decode_lines(path.read_bytes())
        assert not result.errors, (path, result.errors[:3])
        out[path.stem] = result.batch
    return out


@pytest.fixture(scope="session")
def all_flows(fixture_batches: dict[str, pa.RecordBatch]) -> pa.RecordBatch:
    """All fixture flows in one batch, one row per distinct uuid."""
    table = pa.Table.from_batches(list(fixture_batches.values()))
    seen: set[str] = set()
    keep = []
    for i, u in enumerate(table.column("uuid").to_pylist()):
        if u not in seen:
            seen.add(u)
            keep.append(i)
    return table.take(keep).combine_chunks().to_batches()[0]


def make_ctx(name: str = "sink", data_dir: Path | None = None) -> Context:
    return Context(name=name, metrics=Metrics(), node_name="test-node",
                   data_dir=data_dir or Path(tempfile.mkdtemp(prefix="flowship-test-")))


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


def aggregate_rows(batch: pa.RecordBatch, window: str = "60s") -> pa.RecordBatch:
    """Aggregate rows of ``batch`` as the aggregate stage emits them (kind="aggregates")."""
    from exporter.config import parse
    from exporter.pipeline.envelope import Envelope
    from exporter.stages.aggregate import AggregateConfig, AggregateStage

    stage = AggregateStage(parse(AggregateConfig, {"window": window, "clock": "event"}, "test"), make_ctx("agg"))
    out = stage.process(Envelope(batch, []))
    out += stage.close()
    rows = [e.batch for e in out if e.kind == "aggregates" and e.batch.num_rows]
    return pa.Table.from_batches(rows).combine_chunks().to_batches()[0]
