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

from flowship.model.hubble_fields import (
    EXT_INT,
    EXT_TIME,
    EXTENSION_COLUMNS,
    IP_VERSION_OUT,
    L4_PORTED,
)
from flowship.model.schema import TCP_FLAG_BITS
from flowship.model.times import format_time, protojson_times

_ENDPOINT_KEYS = (("ID", "_id"), ("identity", "_identity"), ("cluster_name", "_cluster"),
                  ("namespace", "_namespace"), ("labels", "_labels"), ("pod_name", "_pod"))
_ZEROENUMS = {"VERDICT_UNKNOWN", "UNKNOWN_TYPE", "TRAFFIC_DIRECTION_UNKNOWN", "UNKNOWN_POINT",
               "DROP_REASON_UNKNOWN", "UNKNOWN_L7_TYPE", "TRACE_REASON_UNKNOWN"}


def _set(d: dict, key: str, value: Any) -> None:
    if not value or (value.__class__ is str and value in _ZEROENUMS):
        return
    d[key] = value


def _endpoint_out(col: dict, prefix: str, i: int) -> dict:
    ep: dict[str, Any] = {}
    for key, suffix in _ENDPOINT_KEYS:
        _set(ep, key, col[prefix + suffix][i])
    if name := col[prefix + "_workload"][i]:
        wl = {"name": name}
        _set(wl, "kind", col[prefix + "_workload_kind"][i])
        ep["workloads"] = [wl]
    return ep


def flow_dicts(batch: pa.RecordBatch) -> list[tuple[dict, dict]]:
    """Each row as (Flow object with proto field names, flowship extension object)."""
    col = {name: _column_values(batch, name) for name in batch.schema.names}
    out = []
    flag_items = list(TCP_FLAG_BITS.items())
    for i in range(batch.num_rows):
        f: dict[str, Any] = {"time": format_time(col["time"][i])}
        _set(f, "uuid", col["uuid"][i])
        _set(f, "verdict", col["verdict"][i])
        _set(f, "drop_reason", col["drop_reason_code"][i])
        if col["eth_src"][i] or col["eth_dst"][i]:
            eth: dict[str, Any] = {}
            _set(eth, "source", col["eth_src"][i])
            _set(eth, "destination", col["eth_dst"][i])
            f["ethernet"] = eth
        if col["ip_src"][i] or col["ip_dst"][i]:
            ip: dict[str, Any] = {}
            _set(ip, "source", col["ip_src"][i])
            _set(ip, "source_xlated", col["ip_src_xlated"][i])
            _set(ip, "destination", col["ip_dst"][i])
            _set(ip, "ipVersion", IP_VERSION_OUT.get(col["ip_version"][i]))
            if col["ip_encrypted"][i]:
                ip["encrypted"] = True
            f["IP"] = ip
        proto = col["l4_protocol"][i]
        if proto:
            body: dict[str, Any] = {}
            if proto in L4_PORTED:
                _set(body, "source_port", col["src_port"][i])
                _set(body, "destination_port", col["dst_port"][i])
                flags = col["tcp_flags"][i]
                if flags:
                    body["flags"] = {name: True for name, bit in flag_items if flags & bit}
            elif proto in ("ICMPv4", "ICMPv6"):
                _set(body, "type", col["icmp_type"][i])
                _set(body, "code", col["icmp_code"][i])
            f["l4"] = {proto: body}
        f["source"] = _endpoint_out(col, "src", i)
        f["destination"] = _endpoint_out(col, "dst", i)
        _set(f, "Type", col["flow_type"][i])
        _set(f, "node_name", col["node_name"][i])
        _set(f, "node_labels", col["node_labels"][i])
        _set(f, "source_names", col["src_names"][i])
        _set(f, "destination_names", col["dst_names"][i])
        l7_type = col["l7_type"][i]
        has_http = col["http_method"][i] or col["http_code"][i] or col["http_url"][i]
        has_dns = col["dns_query"][i] is not None or col["dns_rcode"][i] is not None
        if l7_type or has_http or has_dns:
            l7: dict[str, Any] = {}
            _set(l7, "type", l7_type)
            if lat := col["l7_latency_ns"][i]:
                l7["latency_ns"] = str(lat)
            if has_dns:
                dns: dict[str, Any] = {}
                for key, name in (("query", "dns_query"), ("ips", "dns_ips"), ("ttl", "dns_ttl"),
                                  ("cnames", "dns_cnames"), ("observation_source", "dns_observation_source"),
                                  ("rcode", "dns_rcode"), ("qtypes", "dns_qtypes"), ("rrtypes", "dns_rrtypes")):
                    _set(dns, key, col[name][i])
                l7["dns"] = dns
            elif has_http:
                http: dict[str, Any] = {}
                for key, name in (("code", "http_code"), ("method", "http_method"), ("url", "http_url"),
                                  ("protocol", "http_protocol"), ("headers", "http_headers")):
                    _set(http, key, col[name][i])
                l7["http"] = http
            f["l7"] = l7
        if col["reply"][i]:
            f["reply"] = True
        et = col["event_type"][i]
        if et is not None:
            event: dict[str, Any] = {}
            _set(event, "type", et)
            _set(event, "sub_type", col["event_subtype"][i])
            f["event_type"] = event
        for prefix, key in (("src", "source_service"), ("dst", "destination_service")):
            if col[prefix + "_service"][i]:
                svc: dict[str, Any] = {}
                _set(svc, "name", col[prefix + "_service"][i])
                _set(svc, "namespace", col[prefix + "_service_namespace"][i])
                f[key] = svc
        _set(f, "traffic_direction", col["traffic_direction"][i])
        _set(f, "policy_match_type", col["policy_match_type"][i])
        _set(f, "trace_observation_point", col["trace_point"][i])
        _set(f, "trace_reason", col["trace_reason"][i])
        _set(f, "drop_reason_desc", col["drop_reason"][i])
        if (reply := col["is_reply"][i]) is not None:
            f["is_reply"] = reply
        if col["interface_index"][i] is not None or col["interface_name"][i]:
            iface: dict[str, Any] = {}
            _set(iface, "index", col["interface_index"][i])
            _set(iface, "name", col["interface_name"][i])
            f["interface"] = iface
        _set(f, "proxy_port", col["proxy_port"][i])
        if v := col["socket_cookie"][i]:
            f["socket_cookie"] = str(v)
        if v := col["cgroup_id"][i]:
            f["cgroup_id"] = str(v)
        _set(f, "Summary", col["summary"][i])
        if any(col[k][i] for k in ("aggregate_ingress_count", "aggregate_egress_count", "aggregate_unknown_count")):
            agg: dict[str, Any] = {}
            _set(agg, "ingress_flow_count", col["aggregate_ingress_count"][i])
            _set(agg, "egress_flow_count", col["aggregate_egress_count"][i])
            _set(agg, "unknown_direction_flow_count", col["aggregate_unknown_count"][i])
            f["aggregate"] = agg
        ext: dict[str, Any] = {}
        for key in EXTENSION_COLUMNS:
            v = col[key][i]
            if v is None or (key == "sample_rate" and v == 1):
                continue
            if key in EXT_TIME:
                ext[key] = format_time(v)
            elif key in EXT_INT and key != "sample_rate":
                ext[key] = str(v)
            else:
                ext[key] = v
        out.append((f, ext))
    return out


def _column_values(batch: pa.RecordBatch, name: str) -> list:
    column = batch.column(name)
    if pa.types.is_timestamp(column.type):
        return column.cast(pa.int64()).to_pylist()
    return column.to_pylist()


def encode_lines_slow(batch: pa.RecordBatch, extensions: bool = True) -> list[bytes]:
    """Each flow as one ExportEvent JSON line, one Python dict per row (the reference encoder)."""
    lines = []
    dumps = orjson.dumps
    for f, ext in flow_dicts(batch):
        event: dict[str, Any] = {"flow": f, "node_name": f.get("node_name", ""), "time": f["time"]}
        if extensions and ext:
            event["flowship"] = ext
        lines.append(dumps(event) + b"\n")
    return lines


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
# columnar encode
# ------------------------------------------------------------------------------------------
def encode_text_column(batch: pa.RecordBatch, extensions: bool = True) -> pa.Array:
    """Every row's ExportEvent JSON (without newline) as one Arrow string column.

    The same text :func:`encode_lines_slow` produces (up to key order), built
    with Arrow string kernels; rows with unusual control characters in a string
    are encoded with orjson instead.
    """
    import pyarrow.compute as pc

    from flowship.model import json_columns as jc

    n = batch.num_rows
    c = batch.column

    def s(name: str) -> pa.Array:
        return jc.string(jc.omit_default(c(name)))

    def enum(name: str) -> pa.Array:
        col = c(name)
        zero = pc.is_in(col, pa.array(sorted(_ZEROENUMS)))
        return jc.string(pc.if_else(pc.fill_null(zero, False), pa.scalar(None, pa.string()), jc.omit_default(col)))

    def num(name: str) -> pa.Array:
        return jc.number(jc.omit_default(c(name)))

    def q64(name: str) -> pa.Array:
        return jc.quoted_number(jc.omit_default(c(name)))

    def lst(name: str) -> pa.Array:
        return jc.string_list(c(name))

    m = jc.member
    ip_version = pc.if_else(pc.equal(c("ip_version"), 4), "IPv4",
                            pc.if_else(pc.equal(c("ip_version"), 6), "IPv6", pa.scalar(None, pa.string())))
    ip = jc.obj([m("source", s("ip_src")), m("source_xlated", s("ip_src_xlated")), m("destination", s("ip_dst")),
                 m("ipVersion", jc.string(ip_version)), m("encrypted", jc.boolean(jc.omit_default(c("ip_encrypted"))))], n)
    ip = pc.if_else(pc.or_(pc.is_valid(jc.omit_default(c("ip_src"))), pc.is_valid(jc.omit_default(c("ip_dst")))), ip,
                    pa.scalar(None, pa.string()))
    eth = jc.obj([m("source", s("eth_src")), m("destination", s("eth_dst"))], n)

    proto = c("l4_protocol")
    flags_int = c("tcp_flags")
    flag_members = []
    for name, bit in TCP_FLAG_BITS.items():
        has = pc.not_equal(pc.bit_wise_and(pc.fill_null(flags_int, 0), bit), 0)
        flag_members.append(m(name, pc.if_else(has, "true", pa.scalar(None, pa.string()))))
    flags = jc.obj(flag_members, n)
    ported = jc.obj([m("source_port", num("src_port")), m("destination_port", num("dst_port")),
                     m("flags", flags)], n, keep_empty=True)
    ported_no_flags = jc.obj([m("source_port", num("src_port")), m("destination_port", num("dst_port"))], n,
                             keep_empty=True)
    icmp = jc.obj([m("type", num("icmp_type")), m("code", num("icmp_code"))], n, keep_empty=True)
    is_tcp = pc.equal(proto, "TCP")
    is_ported = pc.is_in(proto, pa.array(["TCP", "UDP", "SCTP"]))
    is_icmp = pc.is_in(proto, pa.array(["ICMPv4", "ICMPv6"]))
    body = pc.if_else(is_tcp, ported, pc.if_else(is_ported, ported_no_flags,
                                                   pc.if_else(is_icmp, icmp, "{}")))
    l4 = pc.binary_join_element_wise('{"', proto, '":', body, "}", "")

    def endpoint(prefix: str) -> pa.Array:
        workload = jc.obj([m("name", s(f"{prefix}_workload")), m("kind", s(f"{prefix}_workload_kind"))], n)
        workloads = pc.binary_join_element_wise("[", workload, "]", "")
        return jc.obj([m("ID", num(f"{prefix}_id")), m("identity", num(f"{prefix}_identity")),
                       m("cluster_name", s(f"{prefix}_cluster")), m("namespace", s(f"{prefix}_namespace")),
                       m("labels", lst(f"{prefix}_labels")), m("pod_name", s(f"{prefix}_pod")),
                       m("workloads", pc.if_else(pc.is_valid(jc.omit_default(c(f"{prefix}_workload"))), workloads,
                                                 pa.scalar(None, pa.string())))], n, keep_empty=True)

    def service(prefix: str) -> pa.Array:
        svc = jc.obj([m("name", s(f"{prefix}_service")), m("namespace", s(f"{prefix}_service_namespace"))], n)
        return pc.if_else(pc.is_valid(jc.omit_default(c(f"{prefix}_service"))), svc, pa.scalar(None, pa.string()))

    headers = jc.object_list(c("http_headers"), lambda st: jc.obj(
        [m("key", jc.string(jc.omit_default(pc.struct_field(st, "key")))),
         m("value", jc.string(jc.omit_default(pc.struct_field(st, "value"))))], len(st), keep_empty=True))
    http = jc.obj([m("code", num("http_code")), m("method", s("http_method")), m("url", s("http_url")),
                   m("protocol", s("http_protocol")), m("headers", headers)], n, keep_empty=True)
    dns = jc.obj([m("query", s("dns_query")), m("ips", lst("dns_ips")), m("ttl", num("dns_ttl")),
                  m("cnames", lst("dns_cnames")), m("observation_source", s("dns_observation_source")),
                  m("rcode", num("dns_rcode")), m("qtypes", lst("dns_qtypes")), m("rrtypes", lst("dns_rrtypes"))],
                 n, keep_empty=True)
    has_dns = pc.or_(pc.is_valid(c("dns_query")), pc.is_valid(c("dns_rcode")))
    has_http = pc.or_(pc.or_(pc.is_valid(jc.omit_default(c("http_method"))), pc.is_valid(jc.omit_default(c("http_code")))),
                      pc.is_valid(jc.omit_default(c("http_url"))))
    record = pc.if_else(has_dns, m("dns", dns), pc.if_else(has_http, m("http", http), pa.scalar(None, pa.string())))
    l7 = jc.obj([m("type", enum("l7_type")), m("latency_ns", q64("l7_latency_ns")), record], n)

    event = jc.obj([m("type", jc.number(c("event_type"))), m("sub_type", num("event_subtype"))], n, keep_empty=True)
    event = pc.if_else(pc.is_valid(c("event_type")), event, pa.scalar(None, pa.string()))
    iface = jc.obj([m("index", num("interface_index")), m("name", s("interface_name"))], n, keep_empty=True)
    iface = pc.if_else(pc.or_(pc.is_valid(c("interface_index")), pc.is_valid(jc.omit_default(c("interface_name")))),
                       iface, pa.scalar(None, pa.string()))
    agg = jc.obj([m("ingress_flow_count", num("aggregate_ingress_count")),
                  m("egress_flow_count", num("aggregate_egress_count")),
                  m("unknown_direction_flow_count", num("aggregate_unknown_count"))], n)
    time_text = jc.string(protojson_times(c("time")))
    flow = jc.obj([
        m("time", time_text), m("uuid", s("uuid")), m("verdict", enum("verdict")),
        m("drop_reason", num("drop_reason_code")), m("ethernet", eth), m("IP", ip),
        m("l4", pc.if_else(pc.is_valid(jc.omit_default(proto)), l4, pa.scalar(None, pa.string()))),
        m("source", endpoint("src")), m("destination", endpoint("dst")), m("Type", enum("flow_type")),
        m("node_name", s("node_name")), m("node_labels", lst("node_labels")),
        m("source_names", lst("src_names")), m("destination_names", lst("dst_names")), m("l7", l7),
        m("reply", jc.boolean(jc.omit_default(c("reply")))), m("event_type", event),
        m("source_service", service("src")), m("destination_service", service("dst")),
        m("traffic_direction", enum("traffic_direction")), m("policy_match_type", num("policy_match_type")),
        m("trace_observation_point", enum("trace_point")), m("trace_reason", enum("trace_reason")),
        m("drop_reason_desc", enum("drop_reason")), m("is_reply", jc.boolean(c("is_reply"))),
        m("interface", iface), m("proxy_port", num("proxy_port")), m("socket_cookie", q64("socket_cookie")),
        m("cgroup_id", q64("cgroup_id")), m("Summary", s("summary")), m("aggregate", agg),
    ], n, keep_empty=True)
    members = [m("flow", flow), m("node_name", jc.string(pc.fill_null(c("node_name"), ""))), m("time", time_text)]
    if extensions:
        rate = c("sample_rate")
        ext_members = [m("start_time", jc.string(protojson_times(c("start_time")))), m("flow_event", s("flow_event")),
                       m("kernel_drop_reason", s("kernel_drop_reason"))]
        for key in ("bytes", "packets", "reply_bytes", "reply_packets", "tcp_handshake_ns", "server_time_ns"):
            ext_members.append(m(key, jc.quoted_number(c(key))))
        ext_members.append(m("sample_rate", jc.number(pc.if_else(pc.equal(rate, 1), pa.scalar(None, rate.type), rate))))
        members.append(m("flowship", jc.obj(ext_members, n)))
    text = jc.finish(jc.obj(members, n, keep_empty=True))

    slow = np.zeros(n, dtype=bool)
    for name in batch.schema.names:
        col = c(name)
        if pa.types.is_string(col.type):
            slow |= jc.needs_slow_path(col)
        elif pa.types.is_list(col.type) and pa.types.is_string(col.type.value_type) and col.null_count < n:
            flat_slow = jc.needs_slow_path(col.flatten())
            if flat_slow.any():
                parents = pc.list_parent_indices(col).to_numpy()
                slow[parents[flat_slow]] = True
        elif name == "http_headers" and col.null_count < n:
            flat = col.flatten()
            for key in ("key", "value"):
                flat_slow = jc.needs_slow_path(pc.struct_field(flat, key))
                if flat_slow.any():
                    slow[pc.list_parent_indices(col).to_numpy()[flat_slow]] = True
    if slow.any():
        rows = np.flatnonzero(slow)
        replacement = encode_lines_slow(batch.take(pa.array(rows)), extensions)
        values = text.to_pylist()
        for row, line in zip(rows.tolist(), replacement, strict=True):
            values[row] = line.rstrip(b"\n").decode()
        text = pa.array(values, pa.string())
    return text


def _newline_terminated(batch: pa.RecordBatch, extensions: bool) -> pa.Array:
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(encode_text_column(batch, extensions), "\n", "").cast(pa.binary())


def encode_lines(batch: pa.RecordBatch, extensions: bool = True) -> list[bytes]:
    """Each flow as one ExportEvent JSON line (newline-terminated), as Hubble writes them."""
    if batch.num_rows == 0:
        return []
    return _newline_terminated(batch, extensions).to_pylist()


def encode_ndjson(batch: pa.RecordBatch, extensions: bool = True) -> bytes:
    """All flows of a batch as one NDJSON body, without a Python object per row."""
    if batch.num_rows == 0:
        return b""
    lines = _newline_terminated(batch, extensions)
    offsets = lines.offsets.to_numpy() if hasattr(lines, "offsets") else None
    if offsets is None:
        return b"".join(lines.to_pylist())
    data = lines.buffers()[2]
    return data.to_pybytes()[offsets[0]:offsets[-1]] if data is not None else b""
