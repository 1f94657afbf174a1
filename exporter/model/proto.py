"""Flow batches ↔ ``flow.Flow`` protobuf messages (gRPC and Kafka ``protobuf`` encoding).

Both directions go through the Hubble JSON object form of
:mod:`exporter.model.hubble_json`, so there is one mapping between columns
and Hubble fields to keep true. flowship-only columns (byte counters, sample
rate...) have no Flow field and are not carried by this encoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
from google.protobuf import json_format

from exporter.model.hubble_json import _extension, flatten_flow, flow_dicts, rows_to_batch
from exporter.proto.flow import flow_pb2


def to_flow_messages(batch: pa.RecordBatch) -> list[flow_pb2.Flow]:
    """One ``flow.Flow`` per row."""
    out = []
    for flow, _ext in flow_dicts(batch):
        msg = flow_pb2.Flow()
        json_format.ParseDict(flow, msg, ignore_unknown_fields=True)
        out.append(msg)
    return out


def to_flow_bytes(batch: pa.RecordBatch) -> list[bytes]:
    """Serialized ``flow.Flow`` per row (the Kafka ``protobuf`` encoding)."""
    return [m.SerializeToString() for m in to_flow_messages(batch)]


def from_flow_messages(messages: Sequence[flow_pb2.Flow], node_names: Sequence[str] | None = None,
                       times: Sequence[int | None] | None = None,
                       extensions: Sequence[dict | None] | None = None) -> pa.RecordBatch:
    """Flow messages (e.g. from GetFlowsResponse) → a FLOW_SCHEMA batch.

    ``node_names`` and ``times`` (ns) are the response envelope's values, used
    when the flow itself lacks them, as in Hubble's JSON.
    """
    rows = []
    for i, msg in enumerate(messages):
        obj = json_format.MessageToDict(msg, preserving_proto_field_name=True)
        row: dict = {}
        flatten_flow(obj, row)
        if "time" not in row and times is not None and times[i] is not None:
            row["time"] = times[i]
        if "node_name" not in row and node_names is not None and node_names[i]:
            row["node_name"] = node_names[i]
        if extensions is not None and extensions[i]:
            _extension(extensions[i], row)
        if "time" not in row:
            row["time"] = 0
        rows.append(row)
    return rows_to_batch(rows)


def from_flow_bytes(payloads: Sequence[bytes]) -> pa.RecordBatch:
    """Serialized ``flow.Flow`` messages → a batch (raises DecodeError on bad bytes)."""
    messages = []
    for payload in payloads:
        msg = flow_pb2.Flow()
        msg.ParseFromString(payload)
        messages.append(msg)
    return from_flow_messages(messages)
