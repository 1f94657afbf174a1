"""Hubble JSON out, exactly as Hubble writes it.

protojson with proto field names, enums as names, RFC 3339 timestamps
trimmed like protojson (0, 3, 6 or 9 fractional digits), 64-bit integers as
strings, zero values omitted, ``is_reply`` printed even when false. Values a
Hubble Flow has no field for (the agent's byte counters, a sample rate other
than 1...) travel in a top-level ``"flowship"`` object that Hubble tooling
ignores and :mod:`flowship.model.hubble_decode` reads back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from flowship.model import json_columns as jc
from flowship.model.hubble_fields import EXTENSION_COLUMNS, L4_PORTED
from flowship.model.schema import TCP_FLAG_BITS
from flowship.model.times import format_time, second_text

# enum names protojson never prints (the zero value of each enum); the encoder omits any string equal to one
ZERO_ENUMS = ("VERDICT_UNKNOWN", "UNKNOWN_TYPE", "TRAFFIC_DIRECTION_UNKNOWN", "UNKNOWN_POINT",
              "DROP_REASON_UNKNOWN", "UNKNOWN_L7_TYPE", "TRACE_REASON_UNKNOWN")
_ENDPOINT_KEYS = (("ID", "_id"), ("identity", "_identity"), ("cluster_name", "_cluster"),
                  ("namespace", "_namespace"), ("labels", "_labels"), ("pod_name", "_pod"))

def encode_lost_event(source: str, count: int, node_name: str, time_ns: int,
                      cpu: int | None = None) -> bytes:
    """A ``lost_events`` line as Hubble writes it."""
    lost: dict[str, Any] = {"source": source, "num_events_lost": str(count)}
    if cpu is not None:
        lost["cpu"] = cpu
    return dumps_line({"lost_events": lost, "node_name": node_name, "time": format_time(time_ns)})


def dumps_line(obj: Any) -> bytes:
    return orjson.dumps(obj) + b"\n"


def as_numpy_time(batch: pa.RecordBatch) -> np.ndarray:
    """The ``time`` column as int64 ns (a convenience for sinks and stages)."""
    return batch.column("time").cast(pa.int64()).to_numpy()




# ------------------------------------------------------------------------------------------
# columnar encode: each output field is a column of `"key":value` fragments, joined per object
# ------------------------------------------------------------------------------------------
class _Columns:
    """Fragment builders over one batch, mirroring protojson's rules for absent values."""

    def __init__(self, batch: pa.RecordBatch) -> None:
        self.batch = batch
        self.n = batch.num_rows
        self._zero = pa.array(ZERO_ENUMS, pa.string())
        self._set: dict[str, pa.Array] = {}

    def col(self, name: str) -> pa.Array:
        return jc.contiguous(self.batch.column(name))

    def has(self, name: str) -> pa.Array:
        """Where the column holds a value protojson prints (not null, zero, empty or false)."""
        if name not in self._set:
            self._set[name] = jc.present(self.col(name))
        return self._set[name]

    def text(self, name: str) -> pa.Array:
        """A string column as JSON text, absent where empty or a zero enum name."""
        values = self.col(name)
        printed = pc.and_(self.has(name), pc.invert(pc.fill_null(pc.is_in(values, self._zero), False)))
        return jc.keep(jc.strings(values), printed)

    def number(self, name: str) -> pa.Array:
        return jc.keep(jc.numbers(self.col(name)), self.has(name))

    def quoted(self, name: str) -> pa.Array:
        return jc.keep(jc.quoted_numbers(self.col(name)), self.has(name))

    def strings(self, name: str) -> pa.Array:
        return jc.string_lists(self.col(name))

    def true(self, name: str) -> pa.Array:
        return jc.keep(jc.literal("true", self.n), self.has(name))


def _endpoint(c: _Columns, prefix: str) -> pa.Array:
    fields = []
    for key, suffix in _ENDPOINT_KEYS:
        name = prefix + suffix
        kind = c.batch.schema.field(name).type
        if pa.types.is_list(kind):
            value = c.strings(name)
        elif pa.types.is_string(kind):
            value = c.text(name)
        else:
            value = c.number(name)
        fields.append(jc.field(key, value))
    workload = jc.join([jc.field("name", c.text(prefix + "_workload")),
                        jc.field("kind", c.text(prefix + "_workload_kind"))], c.n)
    workloads = pc.binary_join_element_wise('"workloads":[{', workload, "}]", "")
    fields.append(jc.keep(workloads, c.has(prefix + "_workload")))
    return jc.join(fields, c.n)


def _l4(c: _Columns) -> pa.Array:
    proto = c.col("l4_protocol")
    ported = jc.join([jc.field("source_port", c.number("src_port")),
                      jc.field("destination_port", c.number("dst_port")),
                      jc.keep(_flags(c.col("tcp_flags")), c.has("tcp_flags"))], c.n)
    icmp = jc.join([jc.field("type", c.number("icmp_type")), jc.field("code", c.number("icmp_code"))], c.n)
    is_ported = pc.fill_null(pc.is_in(proto, pa.array(L4_PORTED)), False)
    is_icmp = pc.fill_null(pc.is_in(proto, pa.array(["ICMPv4", "ICMPv6"])), False)
    body = pc.if_else(is_ported, ported, pc.if_else(is_icmp, icmp, ""))
    text = pc.binary_join_element_wise('"l4":{', jc.strings(proto), ":{", body, "}}", "")
    return jc.keep(text, c.has("l4_protocol"))


def _flags(flags: pa.Array) -> pa.Array:
    """``"flags":{...}`` of each TCP flags value: each distinct value is written once, then gathered."""
    values = pc.fill_null(flags, 0).to_numpy(zero_copy_only=False)
    distinct, inverse = np.unique(values, return_inverse=True)
    texts = ['"flags":{' + ",".join(f'"{name}":true' for name, bit in TCP_FLAG_BITS.items() if int(v) & bit) + "}"
             for v in distinct]
    return pa.array(texts, pa.string()).take(pa.array(inverse.reshape(-1)))


def _l7(c: _Columns) -> pa.Array:
    has_dns = pc.or_(pc.is_valid(c.col("dns_query")), pc.is_valid(c.col("dns_rcode")))
    has_http = jc.any_of([c.has("http_method"), c.has("http_code"), c.has("http_url")])
    dns = jc.join([jc.field("query", c.text("dns_query")), jc.field("ips", c.strings("dns_ips")),
                   jc.field("ttl", c.number("dns_ttl")), jc.field("cnames", c.strings("dns_cnames")),
                   jc.field("observation_source", c.text("dns_observation_source")),
                   jc.field("rcode", c.number("dns_rcode")), jc.field("qtypes", c.strings("dns_qtypes")),
                   jc.field("rrtypes", c.strings("dns_rrtypes"))], c.n)
    http = jc.join([jc.field("code", c.number("http_code")), jc.field("method", c.text("http_method")),
                    jc.field("url", c.text("http_url")), jc.field("protocol", c.text("http_protocol")),
                    jc.field("headers", jc.lists(c.col("http_headers"), _header_objects))], c.n)
    record = pc.if_else(has_dns, jc.member("dns", dns),
                        jc.keep(jc.member("http", http), has_http))
    body = jc.join([jc.field("type", c.text("l7_type")), jc.field("latency_ns", c.quoted("l7_latency_ns")),
                    record], c.n)
    return jc.member("l7", body, jc.any_of([c.has("l7_type"), has_http, has_dns]))


def _header_objects(headers: pa.Array) -> pa.Array:
    """Each header struct as ``{"key":...,"value":...}`` (null members as JSON null, like the struct's dict)."""
    text = pc.binary_join_element_wise('{"key":', pc.fill_null(jc.strings(pc.struct_field(headers, "key")), "null"),
                                       ',"value":', pc.fill_null(jc.strings(pc.struct_field(headers, "value")), "null"),
                                       "}", "")
    return jc.keep(text, pc.is_valid(headers)) if headers.null_count else text


def _object(c: _Columns, key: str, members: list[pa.Array], where: pa.Array) -> pa.Array:
    return jc.member(key, jc.join(members, c.n), where)


def _flow(c: _Columns, time_text: pa.Array) -> pa.Array:
    f = jc.field
    ip_version = c.col("ip_version")
    version = pc.if_else(pc.equal(ip_version, 4), '"IPv4"',
                         pc.if_else(pc.equal(ip_version, 6), '"IPv6"', jc.NULL_STR))
    services = [_object(c, f"{side}_service", [f("name", c.text(f"{prefix}_service")),
                                                f("namespace", c.text(f"{prefix}_service_namespace"))],
                        c.has(f"{prefix}_service"))
                for prefix, side in (("src", "source"), ("dst", "destination"))]
    is_reply = c.col("is_reply")
    fields = [
        f("time", time_text), f("uuid", c.text("uuid")), f("verdict", c.text("verdict")),
        f("drop_reason", c.number("drop_reason_code")),
        _object(c, "ethernet", [f("source", c.text("eth_src")), f("destination", c.text("eth_dst"))],
                pc.or_(c.has("eth_src"), c.has("eth_dst"))),
        _object(c, "IP", [f("source", c.text("ip_src")), f("source_xlated", c.text("ip_src_xlated")),
                          f("destination", c.text("ip_dst")), f("ipVersion", version),
                          f("encrypted", c.true("ip_encrypted"))],
                pc.or_(c.has("ip_src"), c.has("ip_dst"))),
        _l4(c),
        jc.member("source", _endpoint(c, "src")), jc.member("destination", _endpoint(c, "dst")),
        f("Type", c.text("flow_type")), f("node_name", c.text("node_name")),
        f("node_labels", c.strings("node_labels")), f("source_names", c.strings("src_names")),
        f("destination_names", c.strings("dst_names")), _l7(c), f("reply", c.true("reply")),
        _object(c, "event_type", [f("type", c.number("event_type")), f("sub_type", c.number("event_subtype"))],
                pc.is_valid(c.col("event_type"))),
        *services,
        f("traffic_direction", c.text("traffic_direction")), f("policy_match_type", c.number("policy_match_type")),
        f("trace_observation_point", c.text("trace_point")), f("trace_reason", c.text("trace_reason")),
        f("drop_reason_desc", c.text("drop_reason")), f("is_reply", jc.booleans(is_reply)),
        _object(c, "interface", [f("index", c.number("interface_index")), f("name", c.text("interface_name"))],
                pc.or_(pc.is_valid(c.col("interface_index")), c.has("interface_name"))),
        f("proxy_port", c.number("proxy_port")), f("socket_cookie", c.quoted("socket_cookie")),
        f("cgroup_id", c.quoted("cgroup_id")), f("Summary", c.text("summary")),
        _object(c, "aggregate", [f("ingress_flow_count", c.number("aggregate_ingress_count")),
                                 f("egress_flow_count", c.number("aggregate_egress_count")),
                                 f("unknown_direction_flow_count", c.number("aggregate_unknown_count"))],
                jc.any_of([c.has("aggregate_ingress_count"), c.has("aggregate_egress_count"),
                           c.has("aggregate_unknown_count")])),
    ]
    return jc.join(fields, c.n)


def _extension(c: _Columns) -> pa.Array:
    """The ``"flowship"`` object's members: every set extension column (sample_rate only when not 1)."""
    fields = []
    for key in EXTENSION_COLUMNS:
        values = c.col(key)
        if pa.types.is_timestamp(values.type):
            value = jc.time_literals(values, second_text)
        elif pa.types.is_string(values.type):
            value = jc.strings(values)
        elif key == "sample_rate":
            value = jc.keep(jc.numbers(values), pc.not_equal(values, 1))
        else:
            value = jc.quoted_numbers(values)
        fields.append(jc.field(key, value))
    return jc.join(fields, c.n)


def _encode(batch: pa.RecordBatch, extensions: bool, newline: bool) -> pa.Array:
    c = _Columns(batch)
    time_text = jc.time_literals(c.col("time"), second_text)
    node = c.text("node_name")
    pieces: list[pa.Array | str] = ['{"flow":{', _flow(c, time_text), '},"node_name":',
                                    pc.fill_null(node, '""'), ',"time":', time_text]
    if extensions:
        ext = _extension(c)
        pieces.append(jc.keep(pc.binary_join_element_wise(',"flowship":{', ext, "}", ""), pc.not_equal(ext, "")))
    pieces.append("}\n" if newline else "}")
    return jc.concat(pieces)


def encode_text_column(batch: pa.RecordBatch, extensions: bool = True) -> pa.Array:
    """Every row's ExportEvent JSON (without newline) as one Arrow string column.

    Byte for byte what ``orjson.dumps`` writes for the event as a dict, built
    from the columns with Arrow string kernels (no Python object per row).
    """
    if batch.num_rows == 0:
        return pa.array([], pa.string())
    return _encode(batch, extensions, newline=False)


def encode_lines(batch: pa.RecordBatch, extensions: bool = True) -> list[bytes]:
    """Each flow as one ExportEvent JSON line (newline-terminated), as Hubble writes them."""
    if batch.num_rows == 0:
        return []
    return _encode(batch, extensions, newline=True).cast(pa.binary()).to_pylist()


def encode_ndjson(batch: pa.RecordBatch, extensions: bool = True) -> bytes:
    """All flows of a batch as one NDJSON body, without a Python object per row."""
    return bytes(ndjson_buffer(batch, extensions))


def ndjson_buffer(batch: pa.RecordBatch, extensions: bool = True) -> memoryview:
    """All flows of a batch as NDJSON, a view of the Arrow text buffer (no copy: for writing out)."""
    if batch.num_rows == 0:
        return memoryview(b"")
    return jc.text_buffer(_encode(batch, extensions, newline=True))
