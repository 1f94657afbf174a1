"""The fast path of Hubble JSON decoding: Arrow's C++ JSON reader plus column flattening.

Arrow parses a chunk of lines against the nested Hubble schema below (unknown
fields ignored) without creating a Python object per flow; flattening into
FLOW_SCHEMA is then a handful of column operations. It gives exactly the
batch the line-by-line decoder in :mod:`flowship.model.hubble_decode` gives, and
declines (returns None) whenever the chunk needs that decoder instead: a
malformed line, enums written as numbers, camelCase keys, bare flows,
``lost_events`` records. The line-by-line decoder then reports precisely.
"""

from __future__ import annotations

import hashlib
import io
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from flowship.model.columns import nonempty, nonzero
from flowship.model.ids import complete, digest_uuid
from flowship.model.schema import FLOW_SCHEMA, TCP_FLAG_BITS, TIMESTAMP

_S, _U32, _B, _L = pa.string(), pa.uint32(), pa.bool_(), pa.list_(pa.string())
_PAIR = pa.struct([("name", _S), ("namespace", _S)])
_ENDPOINT = pa.struct([("ID", _U32), ("identity", _U32), ("cluster_name", _S), ("namespace", _S), ("labels", _L),
                       ("pod_name", _S), ("workloads", pa.list_(pa.struct([("name", _S), ("kind", _S)])))])
_PORTS = pa.struct([("source_port", _U32), ("destination_port", _U32)])
_ICMP = pa.struct([("type", _U32), ("code", _U32)])
_FLAGS = pa.struct([(name, _B) for name in TCP_FLAG_BITS])
_HEADER = pa.struct([("key", _S), ("value", _S)])
_FLOW = pa.struct([
    ("time", TIMESTAMP), ("uuid", _S), ("verdict", _S), ("drop_reason", _U32),
    ("ethernet", pa.struct([("source", _S), ("destination", _S)])),
    ("IP", pa.struct([("source", _S), ("source_xlated", _S), ("destination", _S), ("ipVersion", _S),
                      ("encrypted", _B)])),
    ("l4", pa.struct([("TCP", pa.struct([("source_port", _U32), ("destination_port", _U32), ("flags", _FLAGS)])),
                      ("UDP", _PORTS), ("SCTP", _PORTS), ("ICMPv4", _ICMP), ("ICMPv6", _ICMP)])),
    ("source", _ENDPOINT), ("destination", _ENDPOINT), ("Type", _S), ("node_name", _S), ("node_labels", _L),
    ("source_names", _L), ("destination_names", _L),
    ("l7", pa.struct([("type", _S), ("latency_ns", _S),
                      ("http", pa.struct([("code", _U32), ("method", _S), ("url", _S), ("protocol", _S),
                                          ("headers", pa.list_(_HEADER))])),
                      ("dns", pa.struct([("query", _S), ("ips", _L), ("ttl", _U32), ("cnames", _L),
                                         ("observation_source", _S), ("rcode", _U32), ("qtypes", _L),
                                         ("rrtypes", _L)]))])),
    ("reply", _B), ("event_type", pa.struct([("type", pa.int32()), ("sub_type", pa.int32())])),
    ("source_service", _PAIR), ("destination_service", _PAIR), ("traffic_direction", _S),
    ("policy_match_type", _U32), ("trace_observation_point", _S), ("trace_reason", _S), ("drop_reason_desc", _S),
    ("is_reply", _B), ("interface", pa.struct([("index", _U32), ("name", _S)])), ("proxy_port", _U32),
    ("socket_cookie", _S), ("cgroup_id", _S), ("Summary", _S),
    ("aggregate", pa.struct([("ingress_flow_count", _U32), ("egress_flow_count", _U32),
                             ("unknown_direction_flow_count", _U32)])),
])
_EXTENSION = pa.struct([("start_time", TIMESTAMP), ("flow_event", _S), ("kernel_drop_reason", _S), ("bytes", _S),
                        ("packets", _S), ("reply_bytes", _S), ("reply_packets", _S), ("tcp_handshake_ns", _S),
                        ("server_time_ns", _S), ("sample_rate", _U32), ("community_id", _S)])
INPUT_SCHEMA = pa.schema([("flow", _FLOW), ("node_name", _S), ("time", TIMESTAMP), ("flowship", _EXTENSION)])

_PARSE = pj.ParseOptions(explicit_schema=INPUT_SCHEMA, unexpected_field_behavior="ignore")
# A line that is not a JSON object (``null`` above all) can crash Arrow's JSON reader (apache/arrow#47409):
# such chunks go to the line decoder, which reports the line.
_NOT_AN_OBJECT_FIRST = re.compile(rb"[ \t\r\n]*[^{ \t\r\n]")
_NOT_AN_OBJECT = re.compile(rb"\n[ \t\r]*[^{ \t\r\n]")
_IP_VERSIONS = pa.array(["IPv4", "IPv6"])
_L4_NAMES = ("TCP", "UDP", "SCTP", "ICMPv4", "ICMPv6")


def _field(struct: pa.Array, *path: str) -> pa.Array:
    """A nested child with its parents' nulls applied."""
    for name in path:
        struct = pc.struct_field(struct, name)
    return struct


def _children(struct: pa.Array, columns: dict[str, str]) -> dict[str, pa.Array]:
    """Flow columns taken as they are from children of one struct: column → child name."""
    return {column: _field(struct, child) for column, child in columns.items()}


def _u64(arr: pa.Array) -> pa.Array:
    return nonzero(pc.cast(nonempty(arr), pa.uint64()))


def _first_workload(workloads: pa.Array, key: str) -> pa.Array:
    lengths = pc.fill_null(pc.list_value_length(workloads), 0).to_numpy(zero_copy_only=False)
    if not lengths.any():
        return pa.nulls(len(workloads), _S)
    offsets = workloads.offsets.to_numpy()[:-1] if not isinstance(workloads, pa.ChunkedArray) else None
    values = pc.struct_field(workloads.values, key)
    idx = pa.array(np.where(lengths > 0, offsets, 0), mask=lengths == 0)
    return values.take(idx)


def _user_agent(headers: pa.Array) -> pa.Array:
    n = len(headers)
    if headers.null_count == n:
        return pa.nulls(n, _S)
    flat = headers.flatten()
    parents = pc.list_parent_indices(headers).to_numpy()
    keys = pc.utf8_lower(pc.struct_field(flat, "key"))
    match = np.flatnonzero(pc.fill_null(pc.equal(keys, "user-agent"), False).to_numpy(zero_copy_only=False))
    if not len(match):
        return pa.nulls(n, _S)
    rows, first = np.unique(parents[match], return_index=True)
    take = np.zeros(n, dtype=np.int64)
    mask = np.ones(n, dtype=bool)
    take[rows] = match[first]
    mask[rows] = False
    return pc.struct_field(flat, "value").take(pa.array(take, mask=mask))


def _utf8(data: bytes) -> bool:
    """Arrow's JSON reader does not check UTF-8: invalid bytes would make string columns invalid."""
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def decode_fast(data: bytes) -> pa.RecordBatch | None:
    """Flows of a chunk of Hubble JSON lines, or None when the line decoder must handle it."""
    if _NOT_AN_OBJECT_FIRST.match(data) or _NOT_AN_OBJECT.search(data) or not _utf8(data):
        return None
    try:
        return _decode_fast(data)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
        return None  # a value out of range (a port above 65535...): the line decoder names the line


def _decode_fast(data: bytes) -> pa.RecordBatch | None:
    try:
        table = pj.read_json(io.BytesIO(data), read_options=pj.ReadOptions(use_threads=False, block_size=1 << 24),
                             parse_options=_PARSE)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None
    table = table.combine_chunks()
    n = table.num_rows
    if n == 0:
        return None
    flow = table.column("flow").chunk(0)
    if flow.null_count:
        return None  # bare flows, lost_events or other events: the line decoder knows them
    columns: dict[str, pa.Array] = {}
    columns["time"] = pc.coalesce(_field(flow, "time"), table.column("time").chunk(0))
    if columns["time"].null_count:
        return None
    uuid = nonempty(_field(flow, "uuid"))
    if uuid.null_count:
        lines = [line for line in data.split(b"\n") if line.strip()]
        if len(lines) != n:
            return None
        values = uuid.to_pylist()
        for i in np.flatnonzero(pc.is_null(uuid).to_numpy(zero_copy_only=False)).tolist():
            values[i] = digest_uuid(hashlib.blake2b(lines[i], digest_size=16).hexdigest())
        uuid = pa.array(values, _S)
    columns["uuid"] = uuid
    columns["verdict"] = _field(flow, "verdict")
    columns["drop_reason_code"] = nonzero(_field(flow, "drop_reason"))
    columns["drop_reason"] = _field(flow, "drop_reason_desc")
    columns.update(_children(_field(flow, "ethernet"), {"eth_src": "source", "eth_dst": "destination"}))
    ip = _field(flow, "IP")
    columns.update(_children(ip, {"ip_src": "source", "ip_dst": "destination"}))
    columns["ip_src_xlated"] = nonempty(_field(ip, "source_xlated"))
    version = _field(ip, "ipVersion")
    columns["ip_version"] = pc.if_else(pc.equal(version, "IPv4"), 4, pc.if_else(pc.equal(version, "IPv6"), 6, None)).cast(pa.uint8())
    columns["ip_encrypted"] = pc.if_else(pc.fill_null(_field(ip, "encrypted"), False), True, None)

    l4 = _field(flow, "l4")
    present = {name: pc.is_valid(_field(l4, name)) for name in _L4_NAMES}
    l4_valid = pc.is_valid(l4)
    any_known = present["TCP"]
    for name in _L4_NAMES[1:]:
        any_known = pc.or_(any_known, present[name])
    if pc.any(pc.and_(l4_valid, pc.invert(any_known))).as_py():
        return None  # VRRP, IGMP or empty l4: rare, the line decoder handles them
    proto = pa.nulls(n, _S)
    for name in reversed(_L4_NAMES):
        proto = pc.if_else(present[name], name, proto)
    columns["l4_protocol"] = proto
    columns["src_port"] = pc.coalesce(*(_field(l4, p, "source_port") for p in ("TCP", "UDP", "SCTP"))).cast(pa.uint16())
    columns["dst_port"] = pc.coalesce(*(_field(l4, p, "destination_port") for p in ("TCP", "UDP", "SCTP"))).cast(pa.uint16())
    is_icmp = pc.or_(present["ICMPv4"], present["ICMPv6"])
    for key, col in (("type", "icmp_type"), ("code", "icmp_code")):
        value = pc.fill_null(pc.coalesce(_field(l4, "ICMPv4", key), _field(l4, "ICMPv6", key)), 0)
        columns[col] = pc.if_else(is_icmp, value, None).cast(pa.uint8())
    flags = _field(l4, "TCP", "flags")
    mask = np.zeros(n, dtype=np.uint16)
    for name, bit in TCP_FLAG_BITS.items():
        mask |= np.where(pc.fill_null(_field(flags, name), False).to_numpy(zero_copy_only=False), bit, 0).astype(np.uint16)
    columns["tcp_flags"] = pa.array(mask, mask=pc.is_null(flags).to_numpy(zero_copy_only=False) | (mask == 0))

    for prefix, side in (("src", "source"), ("dst", "destination")):
        ep = _field(flow, side)
        columns[f"{prefix}_id"] = _field(ep, "ID")
        columns[f"{prefix}_identity"] = _field(ep, "identity")
        columns[f"{prefix}_cluster"] = nonempty(_field(ep, "cluster_name"))
        columns[f"{prefix}_namespace"] = nonempty(_field(ep, "namespace"))
        columns[f"{prefix}_pod"] = nonempty(_field(ep, "pod_name"))
        columns[f"{prefix}_labels"] = nonempty(_field(ep, "labels"))
        workloads = _field(ep, "workloads")
        columns[f"{prefix}_workload"] = _first_workload(workloads, "name")
        columns[f"{prefix}_workload_kind"] = _first_workload(workloads, "kind")
        columns.update(_children(_field(flow, f"{side}_service"),
                                 {f"{prefix}_service": "name", f"{prefix}_service_namespace": "namespace"}))
        columns[f"{prefix}_names"] = nonempty(_field(flow, f"{side}_names"))

    columns["flow_type"] = _field(flow, "Type")
    columns["node_name"] = pc.coalesce(nonempty(_field(flow, "node_name")), nonempty(table.column("node_name").chunk(0)))
    columns["node_labels"] = nonempty(_field(flow, "node_labels"))
    l7 = _field(flow, "l7")
    columns["l7_type"] = _field(l7, "type")
    columns["l7_latency_ns"] = _u64(_field(l7, "latency_ns"))
    http = _field(l7, "http")
    columns["http_code"] = _field(http, "code").cast(pa.uint16())
    for key in ("method", "url", "protocol"):
        columns[f"http_{key}"] = _field(http, key)
    headers = nonempty(_field(http, "headers"))
    columns["http_headers"] = headers
    columns["http_user_agent"] = _user_agent(headers)
    dns = _field(l7, "dns")
    for key in ("query", "ips", "ttl", "cnames", "observation_source", "qtypes", "rrtypes"):
        columns[f"dns_{key}"] = _field(dns, key)
    columns["dns_rcode"] = _field(dns, "rcode").cast(pa.uint16())
    columns["reply"] = pc.if_else(pc.fill_null(_field(flow, "reply"), False), True, None)
    event = _field(flow, "event_type")
    columns["event_type"] = pc.if_else(pc.is_valid(event), pc.fill_null(_field(event, "type"), 0), None)
    columns["event_subtype"] = nonzero(_field(event, "sub_type"))
    columns["traffic_direction"] = _field(flow, "traffic_direction")
    columns["policy_match_type"] = nonzero(_field(flow, "policy_match_type"))
    columns["trace_point"] = _field(flow, "trace_observation_point")
    columns["trace_reason"] = _field(flow, "trace_reason")
    columns["is_reply"] = _field(flow, "is_reply")
    columns.update(_children(_field(flow, "interface"), {"interface_index": "index", "interface_name": "name"}))
    columns["proxy_port"] = nonzero(_field(flow, "proxy_port"))
    columns["socket_cookie"] = _u64(_field(flow, "socket_cookie"))
    columns["cgroup_id"] = _u64(_field(flow, "cgroup_id"))
    columns["summary"] = nonempty(_field(flow, "Summary"))
    columns.update(_children(_field(flow, "aggregate"), {"aggregate_ingress_count": "ingress_flow_count",
                                                         "aggregate_egress_count": "egress_flow_count",
                                                         "aggregate_unknown_count": "unknown_direction_flow_count"}))

    ext = table.column("flowship").chunk(0)
    if ext.null_count < n:
        columns["start_time"] = _field(ext, "start_time")
        columns["flow_event"] = _field(ext, "flow_event")
        columns["kernel_drop_reason"] = _field(ext, "kernel_drop_reason")
        for key in ("bytes", "packets", "reply_bytes", "reply_packets", "tcp_handshake_ns", "server_time_ns"):
            columns[key] = pc.cast(_field(ext, key), pa.uint64())
        columns["sample_rate"] = _field(ext, "sample_rate")
        columns["community_id"] = _field(ext, "community_id")

    arrays = []
    for f in FLOW_SCHEMA:
        col = columns.get(f.name)
        if col is None:
            arrays.append(pa.nulls(n, f.type))
        else:
            arrays.append(col if col.type == f.type else col.cast(f.type))
    return complete(pa.RecordBatch.from_arrays(arrays, schema=FLOW_SCHEMA))
