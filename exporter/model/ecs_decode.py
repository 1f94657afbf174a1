"""ECS documents back to flow columns, for the fields the mapping can restore.

The Kafka source reads ``ecs-json`` messages with :func:`decode_ndjson`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pyarrow as pa

from flowship.model.ecs_fields import FLOW_FIELDS
from flowship.model.schema import FLOW_SCHEMA

# ---------------------------------------------------------------------------------------------
# Back from ECS to flow columns
# ---------------------------------------------------------------------------------------------

def _get_path(doc: dict, path: tuple[str, ...]) -> Any:
    node: Any = doc
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
        if node is None:
            # tolerate flattened keys ("source.ip") written by other producers
            return None
    return node


def _lookup(doc: dict, dotted: str, path: tuple[str, ...]) -> Any:
    value = _get_path(doc, path)
    if value is None and dotted in doc:
        value = doc[dotted]
    return value


_RESTORABLE = tuple((f, tuple(f.path.split(".")), f.inverse) for f in FLOW_FIELDS if f.inverse)


def _document_row(doc: dict) -> dict:
    """Flow columns of one ECS document (times as ns integers)."""
    row: dict[str, Any] = {}
    for f, path, column in _RESTORABLE:
        value = _lookup(doc, f.path, path)
        if value is None:
            continue
        row[column] = f.decode(value) if f.decode else value
    if row.get("time") is None:
        raise ValueError("document has no @timestamp")
    return row


def documents_to_flows(docs: Sequence[dict]) -> pa.RecordBatch:
    """Flow rows from ECS documents, for every column the mapping can restore.

    Raises ValueError when a document lacks ``@timestamp``, and Arrow errors
    when a value has the wrong type.
    """
    return _rows_to_batch([_document_row(doc) for doc in docs])


def _rows_to_batch(rows: list[dict]) -> pa.RecordBatch:
    """Flat rows (times as ns integers) → a complete FLOW_SCHEMA batch."""
    from flowship.model.ids import complete

    arrays = []
    for field in FLOW_SCHEMA:
        values = [row.get(field.name) for row in rows]
        if field.name == "uuid":
            values = [v if v is not None else "" for v in values]
        if pa.types.is_timestamp(field.type):
            arrays.append(pa.array(values, pa.int64()).cast(field.type))
        else:
            arrays.append(pa.array(values, type=field.type))
    return complete(pa.RecordBatch.from_arrays(arrays, schema=FLOW_SCHEMA))


_DECODE_ERRORS = (ValueError, TypeError, KeyError, AttributeError, OverflowError, pa.ArrowException)


def decode_ndjson(lines: Sequence[bytes | str]) -> tuple[pa.RecordBatch, list[tuple[int, str]]]:
    """Parse ECS JSON documents back into a flow batch.

    Returns the batch of the decodable documents and ``(index, reason)`` for
    every line that could not be decoded.
    """
    rows: list[dict] = []
    indexes: list[int] = []
    bad: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        try:
            doc = orjson.loads(line)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            rows.append(_document_row(doc))
            indexes.append(i)
        except orjson.JSONDecodeError as exc:
            bad.append((i, f"invalid JSON: {exc}"))
        except _DECODE_ERRORS as exc:
            bad.append((i, f"{type(exc).__name__}: {exc}"))
    try:
        return _rows_to_batch(rows), bad
    except _DECODE_ERRORS:
        good = []
        for i, row in zip(indexes, rows, strict=True):
            try:
                _rows_to_batch([row])
                good.append(row)
            except _DECODE_ERRORS as exc:
                bad.append((i, f"wrong value type: {exc}"))
        bad.sort()
        return _rows_to_batch(good), bad
