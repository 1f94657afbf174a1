"""Fixtures for the stage tests: a fresh context, the recorded Hubble flows decoded."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from stage_helpers import new_context

from flowship.components import Context
from flowship.model.hubble_decode import decode_lines


@pytest.fixture()
def ctx() -> Context:
    return new_context()


@pytest.fixture(scope="session")
def fixture_batches(fixture_files: list[Path]) -> dict[str, pa.RecordBatch]:
    """Each recorded Hubble file decoded to one flow batch, by file name."""
    out = {}
    for path in fixture_files:
        result = decode_lines(path.read_bytes())
        assert not result.errors, f"{path.name}: {result.errors[:3]}"
        out[path.name] = result.batch
    return out


@pytest.fixture(scope="session")
def all_fixture_flows(fixture_batches: dict[str, pa.RecordBatch]) -> pa.RecordBatch:
    table = pa.Table.from_batches(list(fixture_batches.values()))
    return table.combine_chunks().to_batches()[0]
