"""The schema of aggregate rows (``Envelope(kind="aggregates")``), built by the aggregate stage.

One row per (window, node_name, group key). The key columns depend on the
stage's ``group_by`` and keep the types they have in FLOW_SCHEMA; derived
keys (``http_status_class``) are strings. Everything after the keys is fixed:

==================  ======================  ==================================================
column              type                    meaning
==================  ======================  ==================================================
window_start        timestamp[ns, UTC]      start of the tumbling window (inclusive)
window_end          timestamp[ns, UTC]      end of the window (exclusive)
node_name           string                  the flows' node (always a key)
<group_by keys>     as in FLOW_SCHEMA       null in the overflow row
overflow            bool                    true for the row collecting groups beyond max_groups
flows               float64                 estimated flows: sum of sample_rate
flows_raw           uint64                  flows that reached the stage
bytes, packets,     uint64                  plain sums of the counters of those flows
reply_bytes,
reply_packets
bytes_estimate,     float64                 sums re-weighted by sample_rate (estimates of traffic
packets_estimate                            before sampling)
connections         uint64                  distinct connection hashes among those flows
first_seen,         timestamp[ns, UTC]      earliest and latest flow time in the group
last_seen
latency_samples     uint64                  flows with an L7 latency (> 0)
latency_p50_ns,     uint64                  latency percentiles from a log-bucketed histogram
latency_p95_ns,                             (relative error <= 2.2 %), weighted by sample_rate;
latency_p99_ns                              null when the group has no latency
latency_max_ns      uint64                  exact maximum latency
late_flows          uint64                  flows that arrived after their window was emitted
==================  ======================  ==================================================
"""

from __future__ import annotations

import pyarrow as pa

from flowship.model.schema import FLOW_SCHEMA, TIMESTAMP

DEFAULT_GROUP_BY: tuple[str, ...] = (
    "src_namespace", "src_workload", "dst_namespace", "dst_workload", "server_port", "l4_protocol",
    "verdict", "drop_reason", "http_method", "http_status_class",
)

# keys computed from flow columns rather than copied
# (server_port: dst_port, or src_port for reply flows, so both directions of a connection group together)
DERIVED_KEYS: dict[str, pa.DataType] = {"http_status_class": pa.string(), "server_port": pa.uint16()}

METRIC_FIELDS: list[pa.Field] = [
    pa.field("overflow", pa.bool_(), nullable=False),
    pa.field("flows", pa.float64(), nullable=False),
    pa.field("flows_raw", pa.uint64(), nullable=False),
    pa.field("bytes", pa.uint64(), nullable=False),
    pa.field("packets", pa.uint64(), nullable=False),
    pa.field("reply_bytes", pa.uint64(), nullable=False),
    pa.field("reply_packets", pa.uint64(), nullable=False),
    pa.field("bytes_estimate", pa.float64(), nullable=False),
    pa.field("packets_estimate", pa.float64(), nullable=False),
    pa.field("connections", pa.uint64(), nullable=False),
    pa.field("first_seen", TIMESTAMP, nullable=False),
    pa.field("last_seen", TIMESTAMP, nullable=False),
    pa.field("latency_samples", pa.uint64(), nullable=False),
    pa.field("latency_p50_ns", pa.uint64()),
    pa.field("latency_p95_ns", pa.uint64()),
    pa.field("latency_p99_ns", pa.uint64()),
    pa.field("latency_max_ns", pa.uint64()),
    pa.field("late_flows", pa.uint64(), nullable=False),
]


def groupable_columns() -> list[str]:
    """Flow columns usable as group keys: scalar columns plus derived keys."""
    out = [f.name for f in FLOW_SCHEMA
           if not (pa.types.is_list(f.type) or pa.types.is_struct(f.type))]
    return out + list(DERIVED_KEYS)


def key_columns(group_by: list[str] | tuple[str, ...]) -> list[str]:
    """``node_name`` first, then the configured keys without duplicates."""
    out = ["node_name"]
    for name in group_by:
        if name not in out:
            out.append(name)
    return out


def key_type(name: str) -> pa.DataType:
    if name in DERIVED_KEYS:
        return DERIVED_KEYS[name]
    return FLOW_SCHEMA.field(name).type


def aggregate_schema(group_by: list[str] | tuple[str, ...] = DEFAULT_GROUP_BY) -> pa.Schema:
    fields = [pa.field("window_start", TIMESTAMP, nullable=False), pa.field("window_end", TIMESTAMP, nullable=False)]
    fields += [pa.field(name, key_type(name)) for name in key_columns(group_by)]
    fields += METRIC_FIELDS
    return pa.schema(fields, metadata={b"flowship.schema": b"aggregates/1"})
