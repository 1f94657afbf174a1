"""The canonical flattened flow schema.

Every flow that moves through flowship is a row of ``FLOW_SCHEMA``: sources
decode into it, stages compute on its columns, sinks encode from it. One flat
table (no nested structs except small lists) keeps the hot paths columnar and
makes the Parquet output directly queryable. Column names and types are a
public contract (docs/schema.md): only add nullable columns, never rename.
"""

from __future__ import annotations

import pyarrow as pa

TIMESTAMP = pa.timestamp("ns", tz="UTC")
STR_LIST = pa.list_(pa.string())
HEADER = pa.struct([("key", pa.string()), ("value", pa.string())])

# TCP flag bits of the ``tcp_flags`` column, in TCP header order.
TCP_FLAG_BITS: dict[str, int] = {
    "FIN": 0x001,
    "SYN": 0x002,
    "RST": 0x004,
    "PSH": 0x008,
    "ACK": 0x010,
    "URG": 0x020,
    "ECE": 0x040,
    "CWR": 0x080,
    "NS": 0x100,
}


def _endpoint_fields(prefix: str) -> list[pa.Field]:
    """Columns describing one side (``src`` or ``dst``) of a flow."""
    return [
        pa.field(f"{prefix}_id", pa.uint32()),
        pa.field(f"{prefix}_identity", pa.uint32()),
        pa.field(f"{prefix}_cluster", pa.string()),
        pa.field(f"{prefix}_namespace", pa.string()),
        pa.field(f"{prefix}_pod", pa.string()),
        pa.field(f"{prefix}_labels", STR_LIST),
        pa.field(f"{prefix}_workload", pa.string()),
        pa.field(f"{prefix}_workload_kind", pa.string()),
        pa.field(f"{prefix}_service", pa.string()),
        pa.field(f"{prefix}_service_namespace", pa.string()),
        pa.field(f"{prefix}_names", STR_LIST),
    ]


FLOW_FIELDS: list[pa.Field] = [
    # identity and time
    pa.field("time", TIMESTAMP, nullable=False),
    pa.field("uuid", pa.string(), nullable=False),
    pa.field("start_time", TIMESTAMP),
    pa.field("node_name", pa.string()),
    pa.field("node_labels", STR_LIST),
    # verdict
    pa.field("verdict", pa.string()),
    pa.field("drop_reason", pa.string()),
    pa.field("drop_reason_code", pa.uint32()),
    pa.field("kernel_drop_reason", pa.string()),
    # event classification
    pa.field("flow_type", pa.string()),
    pa.field("flow_event", pa.string()),
    pa.field("event_type", pa.int32()),
    pa.field("event_subtype", pa.int32()),
    pa.field("trace_point", pa.string()),
    pa.field("trace_reason", pa.string()),
    pa.field("traffic_direction", pa.string()),
    pa.field("is_reply", pa.bool_()),
    pa.field("reply", pa.bool_()),
    pa.field("policy_match_type", pa.uint32()),
    pa.field("interface_index", pa.uint32()),
    pa.field("interface_name", pa.string()),
    pa.field("proxy_port", pa.uint32()),
    pa.field("socket_cookie", pa.uint64()),
    pa.field("cgroup_id", pa.uint64()),
    # L2 / L3 / L4
    pa.field("eth_src", pa.string()),
    pa.field("eth_dst", pa.string()),
    pa.field("ip_src", pa.string()),
    pa.field("ip_dst", pa.string()),
    pa.field("ip_src_xlated", pa.string()),
    pa.field("ip_version", pa.uint8()),
    pa.field("ip_encrypted", pa.bool_()),
    pa.field("l4_protocol", pa.string()),
    pa.field("src_port", pa.uint16()),
    pa.field("dst_port", pa.uint16()),
    pa.field("icmp_type", pa.uint8()),
    pa.field("icmp_code", pa.uint8()),
    pa.field("tcp_flags", pa.uint16()),
    # endpoints
    *_endpoint_fields("src"),
    *_endpoint_fields("dst"),
    # L7
    pa.field("l7_type", pa.string()),
    pa.field("l7_latency_ns", pa.uint64()),
    pa.field("http_method", pa.string()),
    pa.field("http_url", pa.string()),
    pa.field("http_code", pa.uint16()),
    pa.field("http_protocol", pa.string()),
    pa.field("http_user_agent", pa.string()),
    pa.field("http_headers", pa.list_(HEADER)),
    pa.field("dns_query", pa.string()),
    pa.field("dns_rcode", pa.uint16()),
    pa.field("dns_qtypes", STR_LIST),
    pa.field("dns_rrtypes", STR_LIST),
    pa.field("dns_ips", STR_LIST),
    pa.field("dns_ttl", pa.uint32()),
    pa.field("dns_cnames", STR_LIST),
    pa.field("dns_observation_source", pa.string()),
    # counters (node agent; Hubble flows carry none)
    pa.field("bytes", pa.uint64()),
    pa.field("packets", pa.uint64()),
    pa.field("reply_bytes", pa.uint64()),
    pa.field("reply_packets", pa.uint64()),
    pa.field("tcp_handshake_ns", pa.uint64()),
    pa.field("server_time_ns", pa.uint64()),
    # Hubble aggregate (flow aggregation in Hubble itself)
    pa.field("aggregate_ingress_count", pa.uint32()),
    pa.field("aggregate_egress_count", pa.uint32()),
    pa.field("aggregate_unknown_count", pa.uint32()),
    pa.field("summary", pa.string()),
    # added by flowship
    pa.field("sample_rate", pa.uint32()),
    pa.field("community_id", pa.string()),
]

FLOW_SCHEMA: pa.Schema = pa.schema(FLOW_FIELDS, metadata={b"flowship.schema": b"flow/1"})
FLOW_COLUMNS: tuple[str, ...] = tuple(FLOW_SCHEMA.names)


def empty_flows() -> pa.RecordBatch:
    """A zero-row batch of the flow schema."""
    return pa.RecordBatch.from_pylist([], schema=FLOW_SCHEMA)


def flows_from_rows(rows: list[dict]) -> pa.RecordBatch:
    """Build a flow batch from row dicts; missing columns become null.

    Convenient for tests and slow paths. Empty ``uuid``, ``community_id`` and
    ``sample_rate`` are filled in by :func:`flowship.model.ids.complete`.
    """
    from flowship.model.ids import complete  # ids depends on this module

    arrays = []
    for field in FLOW_SCHEMA:
        values = [row.get(field.name) for row in rows]
        if field.name == "uuid":
            values = [v if v is not None else "" for v in values]
        arrays.append(pa.array(values, type=field.type))
    return complete(pa.RecordBatch.from_arrays(arrays, schema=FLOW_SCHEMA))
