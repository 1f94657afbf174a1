"""Helpers for the stage tests: flow batches from rows or whole columns, a component context."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from flowship.components import Context
from flowship.metrics import Metrics
from flowship.model.schema import FLOW_SCHEMA, flows_from_rows

T0 = 1_700_000_000_000_000_000  # ns


def make_flows(rows: list[dict], **defaults) -> pa.RecordBatch:
    """A flow batch from partial rows; every row gets a time and the given defaults."""
    full = []
    for i, row in enumerate(rows):
        merged = {"time": T0 + i * 1_000_000, **defaults, **row}
        full.append(merged)
    return flows_from_rows(full)


def new_context(name: str = "stage") -> Context:
    return Context(name=name, metrics=Metrics(), node_name="test-node", data_dir=Path("/tmp"))


def dropped(ctx: Context, reason: str | None = None) -> float:
    labels = {"stage": ctx.name}
    if reason is not None:
        labels["reason"] = reason
    return ctx.metrics.value("flowship_stage_dropped_total", **labels)


def columns_batch(n: int, **columns) -> pa.RecordBatch:
    """A flow batch of ``n`` rows from whole columns (numpy or lists); the rest null. Fast for big tests."""
    arrays = []
    for field in FLOW_SCHEMA:
        if field.name in columns:
            arrays.append(pa.array(columns[field.name], type=field.type))
        elif field.name == "time":
            arrays.append(pa.array(T0 + pa.array(range(n)).to_numpy() * 1000, type=field.type))
        elif field.name == "uuid":
            arrays.append(pa.array([f"u{i}" for i in range(n)], type=pa.string()))
        elif field.name == "sample_rate":
            arrays.append(pa.array([1] * n, type=pa.uint32()))
        else:
            arrays.append(pa.nulls(n, field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=FLOW_SCHEMA)
