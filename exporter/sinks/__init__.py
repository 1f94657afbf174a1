"""Sinks: where flows go (Parquet, JSON lines, Loki, Elasticsearch/OpenSearch, Kafka, any HTTP endpoint).

The network sinks are :class:`flowship.sinks.delivery.DeliverySink` subclasses
(batching, retries, acknowledgements, dead letters written once there); the
HTTP ones share :mod:`flowship.sinks.http_client`, the Kafka sink and source
:mod:`flowship.kafka`. What every sink does with the two kinds of rows
(``flows`` and ``aggregates``) lives here.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:  # imported where rows are read: a sink's module loads (to validate a config) without them
    import numpy as np
    import pyarrow as pa


def time_column(batch: pa.RecordBatch, kind: str) -> str | None:
    """The column that dates a row: ``time`` for flows, the window start for aggregate rows."""
    candidates = ("time",) if kind == "flows" else ("window_start", "time", "window_end")
    return next((name for name in candidates if name in batch.schema.names), None)


def row_times(batch: pa.RecordBatch, kind: str) -> np.ndarray:
    """ns since the epoch per row, from :func:`time_column` (now, for rows without one)."""
    import numpy as np
    import pyarrow as pa

    name = time_column(batch, kind)
    if name is None:
        return np.full(batch.num_rows, time.time_ns(), dtype=np.int64)
    return batch.column(name).cast(pa.int64()).to_numpy(zero_copy_only=False)


def aggregate_json(batch: pa.RecordBatch) -> list[bytes]:
    """Aggregate rows as JSON objects, one per row (no trailing newline).

    Columns in schema order, null columns left out, timestamps as RFC 3339 text in UTC with
    nine fraction digits (``2024-05-01T12:00:00.000000000Z``, the spelling of Loki labels,
    logfmt lines and ECS ``date_nanos``). The file/stdout sinks, the Loki sink
    (``aggregate_line_format: json``) and the Kafka sink (all encodings but ``ecs-json`` and
    ``arrow``) write this.
    """
    import pyarrow as pa

    from flowship.model.times import nanos_times

    columns = {}
    for f in batch.schema:
        col = batch.column(f.name)
        columns[f.name] = nanos_times(col).to_pylist() if pa.types.is_timestamp(f.type) else col.to_pylist()
    names = list(columns)
    return [orjson.dumps({k: columns[k][i] for k in names if columns[k][i] is not None})
            for i in range(batch.num_rows)]
