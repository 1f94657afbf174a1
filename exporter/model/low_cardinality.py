"""Flow columns with few distinct values, by name.

Names only, apart from the Arrow schema: the parquet sink's config defaults to them (dictionary encoding),
and loading a config must not load Arrow.
"""

from __future__ import annotations

# Columns that stay stable enough to be bounded label sets or group-by keys.
LOW_CARDINALITY_COLUMNS: frozenset[str] = frozenset(
    {
        "node_name",
        "verdict",
        "drop_reason",
        "kernel_drop_reason",
        "flow_type",
        "flow_event",
        "trace_point",
        "traffic_direction",
        "l4_protocol",
        "l7_type",
        "http_method",
        "http_protocol",
        "src_namespace",
        "dst_namespace",
        "src_workload",
        "dst_workload",
    }
)
