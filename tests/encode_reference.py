"""The per-row encoders: one Python dict per flow, serialised by orjson.

These define the output the columnar encoders of :mod:`flowship.model.hubble_encode`
and :mod:`flowship.model.ecs_encode` must reproduce byte for byte; they are
slow (tens of microseconds a flow) and live here for tests and benchmarks.
"""

from __future__ import annotations

from typing import Any

import orjson
import pyarrow as pa

from flowship.model import ecs_encode
from flowship.model.hubble_encode import ZERO_ENUMS
from flowship.model.hubble_fields import EXT_INT, EXT_TIME, EXTENSION_COLUMNS, IP_VERSION_OUT, L4_PORTED
from flowship.model.schema import TCP_FLAG_BITS
from flowship.model.times import format_time

_ZEROENUMS = frozenset(ZERO_ENUMS)
_ENDPOINT_KEYS = (("ID", "_id"), ("identity", "_identity"), ("cluster_name", "_cluster"),
                  ("namespace", "_namespace"), ("labels", "_labels"), ("pod_name", "_pod"))


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




def ecs_lines_slow(batch: pa.RecordBatch) -> list[bytes]:
    """Each flow as one ECS document: the nested dict of ``to_documents`` through orjson."""
    return [orjson.dumps(doc) for doc in ecs_encode.to_documents(batch)]
