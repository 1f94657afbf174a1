"""Sinks: where flows go (Parquet, JSON lines, Loki, Elasticsearch/OpenSearch, Kafka).

The network sinks share :mod:`exporter.sinks.delivery` (batching, retries,
acknowledgements, dead letters) and :mod:`exporter.sinks.http`.
"""

from __future__ import annotations

import pyarrow as pa


def rows_as_json(batch: pa.RecordBatch) -> list[dict]:
    """Rows as plain dicts without nulls, timestamps as RFC 3339 text (aggregate rows as JSON)."""
    from exporter.model.times import nanos_times

    columns = {}
    for f in batch.schema:
        col = batch.column(f.name)
        columns[f.name] = nanos_times(col).to_pylist() if pa.types.is_timestamp(f.type) else col.to_pylist()
    names = list(columns)
    return [{k: columns[k][i] for k in names if columns[k][i] is not None} for i in range(batch.num_rows)]
